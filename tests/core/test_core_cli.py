"""The ``hvd-largebatch schedule`` command: Goyal's table, --json, --plot, one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvd_largebatch import cli, schedule_command, schedules

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


E = "hvd-largebatch schedule: error: "
SEE = " (see hvd-largebatch schedule --help)"
SHORT = ["schedule", "--base-lr", "0.1", "--global-batch", "1024", "--dataset-size", "50000", "--epochs", "10"]
MAIN_DECAYS = "--decay poly, cosine, linear"

# One row per bad command line: the exact stderr line (exit code 2, nothing on stdout, nothing written).
BAD_ARGS = [
    # argparse's own errors
    (["schedule", "--global-batch", "8192", "--epochs", "90", "--dataset-size", "1281167"],
     E + "the following arguments are required: --base-lr" + SEE),
    (GOYAL_ARGS[:2] + ["abc"] + GOYAL_ARGS[3:], E + "argument --base-lr: invalid float value: 'abc'" + SEE),
    (GOYAL_ARGS[:-2], E + "one of the arguments --dataset-size --steps-per-epoch is required" + SEE),
    (GOYAL_ARGS + ["--steps-per-epoch", "10"],
     E + "argument --steps-per-epoch: not allowed with argument --dataset-size" + SEE),
    (GOYAL_ARGS[:-4] + ["--decay", "exponential", "--dataset-size", "1281167"],
     E + "argument --decay: invalid choice: 'exponential' (choose from 'step', 'poly', 'cosine', 'linear', "
     "'constant')" + SEE),
    (GOYAL_ARGS + ["--scaling", "cubic"],
     E + "argument --scaling: invalid choice: 'cubic' (choose from 'linear', 'sqrt', 'none')" + SEE),
    ([], "hvd-largebatch: error: the following arguments are required: COMMAND (see hvd-largebatch --help)"),
    (["bench-does-not-exist"], "hvd-largebatch: error: argument COMMAND: invalid choice: 'bench-does-not-exist' "
     "(choose from 'schedule', 'bench', 'noise-scale') (see hvd-largebatch --help)"),
    # the library's checks, in flag terms (never world_size, power, end_lr, global_batch)
    (["schedule", "--base-lr", "nan"] + GOYAL_ARGS[3:], E + "--base-lr must be finite, got nan"),
    (["schedule", "--base-lr", "-0.1"] + GOYAL_ARGS[3:], E + "--base-lr must be >= 0, got -0.1"),
    (SHORT + ["--base-batch", "0"], E + "--base-batch must be an integer >= 1, got 0"),
    (GOYAL_ARGS + ["--workers", "3"],
     E + "--global-batch 8192 is not divisible by --workers 3 x --backward-passes-per-step 1; allowed: a multiple of 3"),
    (SHORT + ["--workers", "2", "--backward-passes-per-step", "0"],
     E + "--backward-passes-per-step must be an integer >= 1, got 0"),
    (["schedule", "--base-lr", "0.1", "--per-worker-batch", "64", "--workers", "0", "--epochs", "9",
      "--steps-per-epoch", "9"], E + "--workers must be an integer >= 1, got 0"),
    (SHORT + ["--decay", "poly", "--power", "-1"], E + "--power must be > 0, got -1.0"),
    (SHORT + ["--decay", "poly", "--end-lr", "100"],
     E + "--end-lr must be <= peak for --decay poly, got --end-lr 100.0 > peak=0.4"),
    (GOYAL_ARGS + ["--warmup-start", "peak/world_size"],
     E + "--workers is required for --warmup-start peak/world_size, got None"),
    (SHORT + ["--warmup-start", "half"],
     E + "--warmup-start must be a number >= 0 or one of 'base_lr', 'peak/world_size'; got 'half'"),
    (GOYAL_ARGS + ["--milestones", "60", "30"], E + "--milestones must be strictly increasing, got (60, 30)"),
    (GOYAL_ARGS + ["--milestones", "95"],
     E + "--milestones must lie after the warmup and within training, i.e. in (5, 90] (epochs); got 95"),
    (GOYAL_ARGS + ["--gamma", "0"], E + "--gamma must be > 0, got 0.0"),
    (SHORT[:4] + ["128"] + SHORT[5:], E + "--global-batch 128 is below --base-batch 256, so the scaled peak LR 0.05 is "
     "below the warmup start 0.1 and the warmup would lower the LR (a warm-down); allowed: --global-batch >= "
     "--base-batch, or no warmup (--warmup-epochs 0; --warmup-epochs 0 in goyal and lars_poly) to train at the "
     "scaled-down LR, or a --warmup-start <= the peak"),
    (SHORT + ["--warmup-start", "1"], E + "--warmup-start 1.0 is above peak=0.4: the warmup would lower the LR (a "
     "warm-down); allowed: 0 <= --warmup-start <= peak, or --warmup-epochs 0 (no warmup)"),
    # the command's own checks
    (GOYAL_ARGS[:-1] + ["100"], E + "--dataset-size 100 is smaller than the global batch 8192: an epoch would have "
     "no step; allowed: --dataset-size >= global batch, or --keep-remainder"),
    ([*GOYAL_ARGS[:8], "4", *GOYAL_ARGS[9:]],  # 5 warmup epochs given > 4 epochs
     E + "--warmup-epochs 5 is longer than training (--epochs 4); allowed: 0 <= warmup epochs <= epochs"),
    (["schedule", "--base-lr", "0.1", "--per-worker-batch", "64", "--epochs", "9", "--steps-per-epoch", "9"],
     E + "--per-worker-batch needs --workers (global batch = per-worker batch x workers)"),
    (SHORT[:-1] + ["0.001"], E + "--epochs 0.001 gives no optimizer step at 48 steps per epoch"),
    (SHORT + ["--milestone-unit", "step"], E + "--milestones is required with --milestone-unit step"),
    (SHORT + ["--warmup-epochs", "9.5"], E + "--milestones: the default ones (1/3, 2/3 and 8/9 of --epochs 10) all "
     "lie within the warmup (--warmup-epochs 9.5); pass --milestones"),
    (GOYAL_ARGS + ["--plot", "/nonexistent-dir/sched.png"], E + "--plot directory does not exist: /nonexistent-dir"),
    (GOYAL_ARGS + ["--plot", "sched.unknownformat"], E + "--plot cannot write sched.unknownformat: Format "
     "'unknownformat' is not supported (supported formats: avif, eps, gif, jpeg, jpg, pdf, pgf, png, ps, raw, rgba, "
     "svg, svgz, tif, tiff, webp)"),
    # a flag the chosen recipe does not read is refused, naming what ignores it
    (GOYAL_ARGS[:-4] + ["--decay", "cosine", "--milestones", "30", "--dataset-size", "1281167"],
     E + "--milestones is only used by --decay step; --decay cosine ignores it"),
    (SHORT + ["--decay", "poly", "--milestone-unit", "epoch"],
     E + "--milestone-unit is only used by --decay step; --decay poly ignores it"),
    (SHORT + ["--decay", "cosine", "--gamma", "0.5"], E + "--gamma is only used by --decay step; --decay cosine ignores it"),
    (SHORT + ["--decay", "cosine", "--power", "2"], E + "--power is only used by --decay poly; --decay cosine ignores it"),
    (SHORT + ["--end-lr", "0.01"], E + f"--end-lr is only used by {MAIN_DECAYS}; --decay step ignores it"),
    (SHORT + ["--decay", "constant", "--end-lr", "0"], E + f"--end-lr is only used by {MAIN_DECAYS}; --decay constant "
     "ignores it"),
    (SHORT + ["--warmup", "none", "--warmup-start", "0.1"],
     E + "--warmup-start is only used by --warmup gradual, constant; --warmup none ignores it"),
    (SHORT + ["--warmup", "none", "--warmup-epochs", "0"],
     E + "--warmup-epochs is only used by --warmup gradual, constant; --warmup none ignores it"),
    (SHORT[:-4] + ["--steps-per-epoch", "10", "--epochs", "10", "--keep-remainder"],
     E + "--keep-remainder is only used with --dataset-size; --steps-per-epoch ignores it"),
    (SHORT + ["--backward-passes-per-step", "2"], E + "--backward-passes-per-step is only used with --workers "
     "(per-worker batch = global batch / (workers x passes)); without --workers it is ignored"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[f"{i}" for i in range(len(BAD_ARGS))])
def test_bad_arguments_give_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # nothing may be written outside tmp_path
    code, out, err = run_cli(capsys, argv)
    assert (code, out, err) == (2, "", message + "\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "epochs, warmup_steps, milestones, last_lr",
    [
        # Short runs fail on none of Goyal's 90-epoch numbers: his 5 warmup epochs become 5/90 of the run,
        # his milestones 30, 60, 80 of 90 the same fractions of --epochs.
        (50, 133, [50 / 3, 100 / 3, 400 / 9], 0.4e-3),
        (3, 8, [1, 2, 8 / 3], 0.4e-3),
        (9, 24, [3, 6, 8], 0.4e-3),
        (90, 240, [30, 60, 80], 0.4e-3),
        (200, 240, [200 / 3, 400 / 3, 1600 / 9], 0.4e-3),  # longer runs keep 5 warmup epochs
    ],
)
def test_defaults_follow_the_epochs_given(capsys, epochs, warmup_steps, milestones, last_lr):
    code, out, err = run_cli(capsys, SHORT[:-1] + [str(epochs), "--json"])
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["schedule"]["milestones"] == pytest.approx(milestones, rel=1e-15)
    assert data["summary"]["warmup_steps"] == warmup_steps
    assert data["summary"]["total_steps"] == 48 * epochs
    assert data["table"][-1]["lr"] == pytest.approx(last_lr)
    assert set(data["summary"]["defaults"]) == {"warmup_epochs", "milestones"}


def test_given_values_are_not_reported_as_defaults(capsys):
    code, out, _ = run_cli(capsys, GOYAL_ARGS + ["--milestones", "30", "60", "80"])
    assert code == 0 and "defaults used" not in out
    code, out, _ = run_cli(capsys, SHORT)
    assert code == 0
    assert ("defaults used: --warmup-epochs: Goyal's 5, or 5/90 of a shorter run; --milestones: Goyal's epochs 30, "
            "60, 80 of 90 scaled to --epochs") in out.splitlines()


@pytest.mark.parametrize(
    "message, expected",
    [
        ("world_size must be an integer >= 1, got 0", "--workers must be an integer >= 1, got 0"),
        ("warmup_start must be None when warmup='none', got 0.1", "--warmup-start must be None when --warmup none, got 0.1"),
        ("milestones must lie after the warmup and within training", "--milestones must lie after the warmup and within training"),
        ("milestones are only used by decay='step', got milestones=(30,) with decay='cosine'",
         "--milestones are only used by --decay step, got --milestones (30,) with --decay cosine"),
        ("steps_per_epoch is required for milestones in epochs (milestone_unit='epoch')",
         "--steps-per-epoch is required for milestones in epochs (--milestone-unit epoch)"),
        ("global_batch_size(...) and base_lr_x=1", "global_batch_size(...) and base_lr_x=1"),  # longer names kept
    ],
)
def test_library_names_become_flags(message, expected):
    assert cli.in_flag_terms(message, schedule_command.FLAG_NAMES) == expected


def _options(command: str):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in subparsers.choices[command]._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", ["schedule", "bench"])
def test_help_shows_every_default(capsys, command):
    code, out, _ = run_cli(capsys, [command, "--help"])
    assert code == 0
    undocumented = [a.option_strings[0] for a in _options(command)
                    if "default" not in (a.help or "") and not a.required and "required" not in (a.help or "")]
    assert undocumented == []
    assert len(_options(command)) >= 15


def test_closed_pipe_ends_quietly(tmp_path):
    """``hvd-largebatch schedule ... | head`` when head has gone: exit 141 as a SIGPIPE'd tool, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "hvd_largebatch", *GOYAL_ARGS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
    proc.stdout.close()  # the reader goes away before the command writes anything
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err.decode()) == (cli.BROKEN_PIPE_EXIT, "")


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
    assert bad.stderr.strip().splitlines() == ["hvd-largebatch schedule: error: --base-lr must be finite, got nan"]
