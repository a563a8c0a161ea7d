"""The ``hvd-largebatch schedule`` command: Goyal's table, --json, --plot, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvd_largebatch import cli, schedules

REPO = Path(__file__).resolve().parents[2]
GOYAL_ARGS = [
    "schedule", "--base-lr", "0.1", "--base-batch", "256", "--global-batch", "8192", "--epochs", "90",
    "--warmup-epochs", "5", "--decay", "step", "--dataset-size", "1281167",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def table_lrs(text: str) -> dict[int, float]:
    """``{step: lr}`` from the printed table (rows start with the step number)."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "epoch", "lr"])
    rows = {}
    for line in lines[header + 1 :]:
        parts = line.split()
        if not parts or not parts[0].isdigit():
            break
        rows[int(parts[0])] = float(parts[2])
    return rows


def test_goyal_recipe_table_and_plot(capsys, tmp_path):
    plot = tmp_path / "sched.png"
    code, out, err = run_cli(capsys, GOYAL_ARGS + ["--plot", str(plot)])
    assert (code, err) == (0, "")
    lrs = table_lrs(out)
    spe = 1281167 // 8192  # 156
    expected = {0: 0.1, 1: 0.1 + 3.1 / 780, 780: 3.2, 30 * spe: 0.32, 60 * spe: 0.032, 80 * spe: 0.0032, 90 * spe: 0.0032}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-5), step  # printed with 6 significant digits
    assert lrs[30 * spe - spe * 10] == pytest.approx(3.2)  # epoch 20 boundary row
    assert "peak LR 3.2" in out and "total steps 14040" in out and "156 steps per epoch" in out
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 10_000


def test_json_output_parses_and_matches_the_library(capsys):
    code, out, _ = run_cli(capsys, GOYAL_ARGS + ["--json"])
    assert code == 0
    data = json.loads(out)
    schedule = schedules.Schedule.from_config(data["schedule"])
    assert schedule == schedules.goyal(0.1, 256, 8192, steps_per_epoch=156, epochs=90)
    assert data["summary"]["peak"] == pytest.approx(3.2)
    assert (data["summary"]["total_steps"], data["summary"]["warmup_steps"]) == (14040, 780)
    by_step = {row["step"]: row for row in data["table"]}
    assert by_step[4680]["lr"] == pytest.approx(0.32, rel=1e-12) and by_step[4680]["epoch"] == 30.0
    assert all(row["lr"] == schedule(row["step"]) for row in data["table"])
    assert data["plot"] is None


def test_per_worker_batch_and_horovod_warmup_start(capsys):
    argv = ["schedule", "--base-lr", "0.1", "--per-worker-batch", "256", "--workers", "32", "--epochs", "90",
            "--steps-per-epoch", "156", "--warmup-start", "peak/world_size", "--json"]
    code, out, _ = run_cli(capsys, argv)
    assert code == 0
    data = json.loads(out)
    assert data["summary"]["global_batch"] == 8192 and data["summary"]["per_worker_batch"] == 256
    assert data["table"][0]["lr"] == pytest.approx(3.2 / 32, rel=1e-12)


@pytest.mark.parametrize(
    "extra, end_lr",
    [
        (["--decay", "poly", "--power", "2", "--end-lr", "0.001"], 0.001),
        (["--decay", "cosine"], 0.0),
        (["--decay", "linear", "--end-lr", "0.01"], 0.01),
        (["--decay", "constant", "--warmup", "constant", "--warmup-epochs", "1"], 0.8),
        (["--decay", "step", "--milestones", "300", "600", "--milestone-unit", "step"], 0.008),
        (["--decay", "constant", "--warmup", "none"], 0.8),
    ],
)
def test_every_decay_kind_from_the_command_line(capsys, extra, end_lr):
    argv = ["schedule", "--base-lr", "0.1", "--global-batch", "2048", "--epochs", "10",
            "--steps-per-epoch", "100", "--json"] + extra
    if "--warmup" not in extra:
        argv += ["--warmup-epochs", "1"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    data = json.loads(out)
    expected_warmup = 0 if "none" in extra else 100
    assert data["summary"]["warmup_steps"] == expected_warmup
    table = data["table"]
    assert table[-1]["step"] == 1000 and table[-1]["lr"] == pytest.approx(end_lr, abs=1e-15, rel=1e-12)


BAD_ARGS = [
    (["schedule", "--global-batch", "8192", "--epochs", "90", "--dataset-size", "1281167"], "--base-lr"),
    (GOYAL_ARGS[:2] + ["abc"] + GOYAL_ARGS[3:], "--base-lr"),
    (["schedule", "--base-lr", "nan"] + GOYAL_ARGS[3:], "base_lr"),
    (["schedule", "--base-lr", "-0.1"] + GOYAL_ARGS[3:], "base_lr"),
    (GOYAL_ARGS[:-2], "--dataset-size"),
    (GOYAL_ARGS + ["--steps-per-epoch", "10"], "--steps-per-epoch"),
    ([*GOYAL_ARGS[:8], "4", *GOYAL_ARGS[9:]], "--warmup-epochs"),  # 5 warmup epochs > 4 epochs
    (GOYAL_ARGS + ["--workers", "3"], "global_batch"),  # 8192 not divisible by 3
    (["schedule", "--base-lr", "0.1", "--per-worker-batch", "64", "--epochs", "9", "--steps-per-epoch", "9"], "--workers"),
    (GOYAL_ARGS[:-4] + ["--decay", "exponential", "--dataset-size", "1281167"], "--decay"),
    (GOYAL_ARGS[:-4] + ["--decay", "cosine", "--milestones", "30", "--dataset-size", "1281167"], "--milestones"),
    (GOYAL_ARGS + ["--milestones", "60", "30"], "milestones"),
    (GOYAL_ARGS + ["--milestones", "95"], "milestones"),
    (GOYAL_ARGS + ["--gamma", "0"], "gamma"),
    (GOYAL_ARGS[:-1] + ["100"], "dataset_size"),
    (GOYAL_ARGS + ["--warmup-start", "peak/world_size"], "world_size"),
    (GOYAL_ARGS + ["--scaling", "cubic"], "--scaling"),
    (GOYAL_ARGS + ["--plot", "/nonexistent-dir/sched.png"], "--plot"),
    (GOYAL_ARGS + ["--plot", "sched.unknownformat"], "format"),
    ([], "COMMAND"),
    (["bench-does-not-exist"], "invalid choice"),
]


@pytest.mark.parametrize("argv, mentioned", BAD_ARGS, ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD_ARGS)])
def test_bad_arguments_give_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, mentioned):
    monkeypatch.chdir(tmp_path)  # nothing may be written outside tmp_path
    code, out, err = run_cli(capsys, argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hvd-largebatch") and "error:" in lines[0]
    assert mentioned in lines[0]
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_help_exits_zero(capsys):
    code, out, _ = run_cli(capsys, ["schedule", "--help"])
    assert code == 0 and "--warmup-start" in out and "--dataset-size" in out


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def test_console_script_and_module_entry_points(tmp_path):
    script = Path(sys.executable).with_name("hvd-largebatch")
    assert script.exists(), f"console script missing next to {sys.executable}: is the package installed (pip install -e .)?"
    plot = tmp_path / "sched.png"
    ok = subprocess.run([str(script), *GOYAL_ARGS, "--plot", str(plot)], capture_output=True, text=True,
                        env=_env(), timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert table_lrs(ok.stdout)[780] == pytest.approx(3.2) and plot.read_bytes()[:8] == PNG_MAGIC
    bad = subprocess.run([sys.executable, "-m", "hvd_largebatch", "schedule", "--base-lr", "nan", *GOYAL_ARGS[3:]],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["hvd-largebatch schedule: error: base_lr must be finite, got nan"]
