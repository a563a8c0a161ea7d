"""``hvd-largebatch noise-scale``: bad arguments in one line, and a real tiny run under horovodrun -np 2 (Gloo)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest

from hvd_largebatch import cli


@pytest.mark.parametrize(
    "argv, mentioned",
    [
        (["--interval", "0"], "--interval"),
        (["--ema-decay", "1.0"], "ema_decay"),
        (["--global-batch", "101", "--workers", "2"], "--global-batch"),
        (["--train-size", "32", "--global-batch", "64"], "--train-size"),
        (["--epochs", "0"], "--epochs"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, argv, mentioned):
    assert cli.main(["noise-scale", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hvd-largebatch noise-scale: error:") and mentioned in err[0]


def test_tiny_run_writes_the_table_the_csv_and_the_plot(tmp_path):
    out = tmp_path / "noise"
    env = {**os.environ, "HVD_LB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hvd_largebatch", "noise-scale", "--global-batch", "64", "--epochs", "2",
               "--train-size", "512", "--workers", "2", "--ema-decay", "0.9", "--out", str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(out / "noise_scale.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(16))  # 2 epochs x 512/64 steps, measured every step
    finite = [float(r["b_simple"]) for r in rows if math.isfinite(float(r["b_simple"]))]
    assert finite and all(value > 0 for value in finite)
    table = (out / "noise_scale.md").read_text()
    assert "| step | epoch | train loss | B_simple |" in table and "global batch 64" in table
    assert (out / "noise_scale.png").stat().st_size > 1000
    assert "global batch 64" in proc.stdout.strip().splitlines()[-1]  # the advice, printed at the end
