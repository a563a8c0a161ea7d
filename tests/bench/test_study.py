"""Tests of the batch-size study's measurements and bookkeeping, and a real tiny study under horovodrun.

The framework-free parts are checked in-process against numbers known in
advance: the fit ``S = S_min (1 + B_crit/B)`` on points generated from the
model, steps to a target from a known accuracy trace (including "never
reached"), the monitor's stopping rules, the noise-scale estimator on exact
norms, the choice of the best trial and its stability when a study is
interrupted and resumed (a fake runner whose results are a function of the
plan stands in for a framework). The end-to-end test runs
``hvd-largebatch bench`` for real under ``horovodrun -np 2`` (Gloo): one
method, two batch sizes, two trials (two LRs), one repeat, a low target;
every output file must appear and agree with results.json, and the same
command again must launch nothing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from hvd_largebatch.bench import report, study
from hvd_largebatch.bench.data import MNIST1DSpec
from hvd_largebatch.bench.noise_estimate import NoiseScaleEMA
from hvd_largebatch.bench.recipes import CellPlan
from hvd_largebatch.bench.results import FailureMarkers, ResultsStore
from hvd_largebatch.bench.run_monitor import DIVERGENCE_LOSS, RunMonitor
from hvd_largebatch.bench.scaling_fit import fit_critical_batch, predicted_steps
from hvd_largebatch.bench.targets import evaluation_steps, steps_to_target
from hvd_largebatch.bench.tuning import SearchSpace, best_trial, trial_settings
from hvd_largebatch.bench.worker import CellFailed, WorkerJob, run_job

TINY = MNIST1DSpec(train_size=1280, test_size=256)


def settings(**kwargs):
    values = dict(targets=(0.9, 0.95), search=SearchSpace(trials=3), seeds=2, epochs=1, workers=2, data=TINY,
                  validation_size=256)
    values.update(kwargs)
    return study.StudySettings(**values)


# --------------------------------------------------------------------------------------------
# The critical-batch fit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s_min,b_crit", [(50.0, 4096.0), (120.0, 600.0), (7.5, 20000.0)])
def test_fit_recovers_s_min_and_b_crit_from_points_of_the_model(s_min, b_crit):
    batches = [32, 128, 512, 2048, 8192, 32768]
    steps = [predicted_steps(s_min, b_crit, b) for b in batches]
    fit = fit_critical_batch(batches, steps)
    assert fit.s_min == pytest.approx(s_min, rel=1e-9)
    assert fit.b_crit == pytest.approx(b_crit, rel=1e-9)
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=1e-9)
    assert fit.r_squared == pytest.approx(1.0) and fit.max_relative_error < 1e-9 and fit.points == 6


def test_fit_with_noise_stays_close_and_reports_no_bend_or_too_few_points():
    batches = [64, 256, 1024, 4096]
    noise = [1.03, 0.98, 1.02, 0.97]  # +-3% on each point
    fit = fit_critical_batch(batches, [predicted_steps(80, 600, b) * n for b, n in zip(batches, noise)])
    assert fit.s_min == pytest.approx(80, rel=0.15) and fit.b_crit == pytest.approx(600, rel=0.15)
    assert 0.99 < fit.r_squared < 1.0
    # Steps that grow with the batch: no bend in range, no B_crit.
    rising = fit_critical_batch([64, 256, 1024], [100, 120, 140])
    assert rising.b_crit is None and rising.e_min is None and rising.slope < 0
    assert fit_critical_batch([256, 256], [100, 90]) is None
    with pytest.raises(ValueError, match="steps must be finite numbers > 0"):
        fit_critical_batch([64, 256], [100, math.nan])
    with pytest.raises(ValueError, match="same length"):
        fit_critical_batch([64, 256], [100])


# --------------------------------------------------------------------------------------------
# Steps to target, the evaluation schedule and the monitor
# --------------------------------------------------------------------------------------------
def test_steps_to_target_is_the_first_evaluation_at_or_above_the_target():
    trace = [(1, 0.1), (2, 0.4), (4, 0.89), (8, 0.9), (16, 0.85), (32, 0.97)]
    assert steps_to_target(trace, 0.9) == 8  # reached exactly; the later dip does not matter
    assert steps_to_target(list(reversed(trace)), 0.9) == 8  # order of the pairs does not matter
    assert steps_to_target(trace, 0.95) == 32
    assert steps_to_target(trace, 0.98) is None  # never reached: None, not the budget
    assert steps_to_target([], 0.5) is None
    with pytest.raises(ValueError, match="target must be an accuracy in"):
        steps_to_target(trace, 1.5)


def test_evaluation_steps_are_geometric_include_the_budget_and_do_not_depend_on_the_run():
    steps = evaluation_steps(1000)
    assert steps[:8] == [1, 2, 3, 4, 5, 6, 7, 8] and steps[-1] == 1000
    assert all(b <= a * 2 ** (1 / 8) + 1 for a, b in zip(steps, steps[1:]))  # at most one ratio (plus rounding)
    assert 55 < len(steps) < 80  # at most log(1000) / log(2 ** (1 / 8)) = 80, fewer where ceil repeats
    assert evaluation_steps(100) == [s for s in steps if s <= 100] + ([100] if 100 not in steps else [])
    with pytest.raises(ValueError, match="total_steps"):
        evaluation_steps(0)
    with pytest.raises(ValueError, match="ratio"):
        evaluation_steps(10, 1.0)


def tiny_plan(**kwargs):
    s = settings(**kwargs)
    return study.tuning_runs("torch", "lars", 256, s)[0]


def test_monitor_stops_at_the_targets_and_records_steps_to_each():
    plan = tiny_plan()
    monitor = RunMonitor(plan)
    accuracies = {}
    stopped_at = None
    for step in range(1, plan.total_steps + 1):
        assert not monitor.after_step(mean_loss=1.0, small_sq_norm=None, big_sq_norm=None)
        if monitor.wants_evaluation():
            accuracies[step] = min(0.99, 0.1 * step)  # 0.9 first at step 9, 0.95 first at step 10
            if monitor.after_evaluation(accuracies[step], 0.5):
                stopped_at = step
                break
    assert stopped_at == 10
    result = monitor.result(0.4, 0.93)
    assert result["steps_to_target"] == {"0.9": 9, "0.95": 10} and result["stopped"] == "target"
    assert result["examples_to_target"] == {"0.9": 9 * 256, "0.95": 10 * 256}
    assert result["steps"] == 10 and result["trace"][-1] == [10, 0.99, 0.5]


def test_monitor_stops_a_diverging_run_at_once_and_a_slow_one_at_its_budget():
    plan = tiny_plan()
    for bad in ({"mean_loss": math.nan}, {"mean_loss": DIVERGENCE_LOSS * 1.01}, {"mean_loss": 1.0, "skipped": True}):
        monitor = RunMonitor(plan)
        assert not monitor.after_step(1.0)
        assert monitor.after_step(**bad)
        result = monitor.result(2.3, 0.1)
        assert result["stopped"] == "diverged" and result["steps"] == 2
        assert result["steps_to_target"] == {"0.9": None, "0.95": None}
    slow = RunMonitor(plan)
    for _ in range(plan.total_steps):
        slow.after_step(1.0)
        if slow.wants_evaluation() and slow.after_evaluation(0.5, 1.0):
            break
    result = slow.result(1.0, 0.5)
    assert result["stopped"] == "budget" and result["steps"] == plan.total_steps
    assert result["steps_to_target"] == {"0.9": None, "0.95": None}
    fixed = RunMonitor(study.fixed_epoch_run("torch", "lars", 256, settings(), plan.to_config()))
    for _ in range(3):
        fixed.after_step(1.0)
        assert not (fixed.wants_evaluation() and fixed.after_evaluation(0.99, 0.1))  # no early stop


def test_noise_scale_estimate_recovers_b_simple_from_exact_norms():
    g2, trace = 0.25, 300.0  # B_simple = 1200
    ema = NoiseScaleEMA(small_batch=32, big_batch=64, ema_decay=0.9)
    for _ in range(5):
        value = ema.update(g2 + trace / 32, g2 + trace / 64)
    assert value == pytest.approx(trace / g2)
    assert ema.update(float("nan"), 1.0) == pytest.approx(trace / g2)  # a non-finite step is skipped
    assert ema.estimator.skipped == 1
    assert NoiseScaleEMA(8, 16).value is None
    assert NoiseScaleEMA(8, 16, ema_decay=0.0).update(1.0, 2.0) is None  # tr(Sigma) estimate < 0: undefined
    with pytest.raises(ValueError, match="big_batch must be larger"):
        NoiseScaleEMA(16, 16)


# --------------------------------------------------------------------------------------------
# Tuning: the trials, the choice, resuming
# --------------------------------------------------------------------------------------------
def test_every_method_gets_the_same_trials_and_warmup_only_where_it_warms_up():
    space = SearchSpace(trials=5)
    with_warmup, without = trial_settings(space, warmup=True), trial_settings(space, warmup=False)
    assert len(with_warmup) == len(without) == 5
    assert [(t.lr_multiplier, t.horizon_multiplier) for t in with_warmup] == [
        (t.lr_multiplier, t.horizon_multiplier) for t in without]
    assert [round(t.lr_multiplier, 6) for t in with_warmup[:3]] == [1.0, 0.5, 2.0]
    assert all(0 < t.warmup_fraction <= 0.3 for t in with_warmup) and all(t.warmup_fraction == 0 for t in without)
    s = settings()
    for method in ("sgd", "clars"):
        assert all(p.schedule.warmup_steps == 0 for p in study.tuning_runs("torch", method, 256, s))
    assert all(p.schedule.warmup_steps > 0 for p in study.tuning_runs("torch", "lars", 1024, s))


def test_best_trial_is_the_fewest_steps_then_the_best_accuracy_then_the_first():
    assert best_trial([{"steps_to_target": None, "best_accuracy": 0.99},
                       {"steps_to_target": 50, "best_accuracy": 0.91},
                       {"steps_to_target": 40, "best_accuracy": 0.90}]) == 2
    assert best_trial([{"steps_to_target": 40, "best_accuracy": 0.90},
                       {"steps_to_target": 40, "best_accuracy": 0.93}]) == 1
    assert best_trial([{"steps_to_target": None, "best_accuracy": 0.5},
                       {"steps_to_target": None, "best_accuracy": 0.7}]) == 1
    assert best_trial([{"steps_to_target": 7, "best_accuracy": 0.9}] * 2) == 0
    with pytest.raises(ValueError, match="at least one trial"):
        best_trial([])


class FakeRunner:
    """Rank 0 of 1; a run's steps to target are a fixed function of its plan (its LR, horizon and seed)."""

    rank, size = 0, 1

    def __init__(self, fail_on=None):
        self.ran, self.fail_on = [], fail_on

    def broadcast_object(self, value):
        return value

    def run_cell(self, plan, data, on_epoch):
        self.ran.append(plan.key)
        if plan.key == self.fail_on:
            raise RuntimeError("injected by the fake runner")
        # The best LR multiplier is 2 at batch 1024 and 0.5 at 256: distance from it costs steps.
        best = 2.0 if plan.global_batch == 1024 else 0.5
        steps = int(20 + 30 * abs(math.log2(plan.lr_multiplier / best)) + plan.seed)
        reached = {"0.9": steps, "0.95": steps + 5} if steps < plan.total_steps else {"0.9": None, "0.95": None}
        return {"steps_to_target": reached, "stopped": "target", "steps": steps, "best_validation_accuracy": 0.96,
                "final_validation_accuracy": 0.96, "trace": [[steps, 0.96, 0.1]], "noise_scale": [[steps, 500.0]],
                "b_simple_at_target": 500.0 + plan.global_batch, "test_accuracy": 0.95, "test_loss": 0.2,
                "train_loss": 0.2, "seconds": 0.01, "skipped_steps": 0}


def run_fake_study(out_dir, runner, methods=("lars",), batches=(256, 1024)):
    s = settings()
    store = ResultsStore(out_dir)
    store.adopt_settings(s.to_config())
    store.save()
    job = WorkerJob(framework="torch", out_dir=str(out_dir), settings=s.to_config(), methods=tuple(methods),
                    batch_sizes=tuple(batches))
    lines = []
    run_job(job, runner, echo=lines.append)
    return lines


def test_tuning_picks_the_best_trial_and_an_interrupted_study_resumes_to_the_same_choice(tmp_path, monkeypatch):
    monkeypatch.setattr("hvd_largebatch.bench.worker.load_mnist1d", lambda spec: None)
    whole = FakeRunner()
    lines = run_fake_study(tmp_path / "whole", whole)
    per_cell = study.runs_per_cell(settings())
    assert len(whole.ran) == 2 * per_cell == 12
    # Trials 0..2 use LR multipliers 1, 0.5, 2: the best is trial 1 at batch 256 and trial 2 at 1024.
    assert whole.ran[:per_cell] == [
        "torch:lars:256:tune:0:0", "torch:lars:256:tune:1:0", "torch:lars:256:tune:2:0",
        "torch:lars:256:seed:1:1", "torch:lars:256:seed:1:2", "torch:lars:256:epochs:1:0"]
    assert whole.ran[per_cell + 3:per_cell + 5] == ["torch:lars:1024:seed:2:1", "torch:lars:1024:seed:2:2"]
    assert lines[0].startswith("[ 1/12] torch lars     batch   256 trial 0: peak LR")

    # The same study interrupted in the middle of the second cell's tuning, then resumed.
    parts = tmp_path / "parts"
    with pytest.raises(CellFailed, match="lars batch 1024 tune 1 seed 0"):
        run_fake_study(parts, FakeRunner(fail_on="torch:lars:1024:tune:1:0"))
    assert FailureMarkers(parts).first_cause()["key"] == "torch:lars:1024:tune:1:0"
    resumed = FakeRunner()
    run_fake_study(parts, resumed)
    assert resumed.ran == whole.ran[per_cell + 1:]  # nothing finished is run again
    key = lambda r: r["key"]  # noqa: E731
    assert sorted(map(key, ResultsStore(parts).records)) == sorted(map(key, ResultsStore(tmp_path / "whole").records))
    assert study.next_run("torch", ["lars"], [256, 1024], settings(), ResultsStore(parts).records) is None

    analysis = report.analyse(ResultsStore(parts).records)
    cells = analysis["torch"]["methods"]["lars"]["cells"]
    assert cells["256"]["best_trial"] == 1 and cells["1024"]["best_trial"] == 2
    assert report.analyse(ResultsStore(tmp_path / "whole").records) == analysis
    # Median over the best trial (seed 0) and its repeats (seeds 1, 2): 20, 21, 22 steps.
    assert cells["256"]["steps"]["0.9"] == {"median": 21, "min": 20, "max": 22, "reached": 3, "runs": 3}
    assert cells["256"]["fixed_epochs"]["test_accuracy"] == 0.95
    assert cells["1024"]["b_simple"] == 1524.0


def test_a_planning_error_stops_every_rank(tmp_path, monkeypatch):
    monkeypatch.setattr("hvd_largebatch.bench.worker.load_mnist1d", lambda spec: None)
    with pytest.raises(CellFailed, match="planning the next run failed"):
        run_fake_study(tmp_path, FakeRunner(), batches=(255,))  # not a multiple of the 2 workers


def test_settings_and_lists_are_checked_naming_the_argument():
    with pytest.raises(ValueError, match="targets must be a non-empty ascending list"):
        settings(targets=(0.95, 0.9))
    with pytest.raises(ValueError, match="validation_size must be smaller"):
        settings(validation_size=TINY.train_size)
    with pytest.raises(ValueError, match="seeds must be an integer >= 0"):
        settings(seeds=-1)
    with pytest.raises(ValueError, match="batch_sizes must be at most the training examples"):
        study.tuning_runs("torch", "lars", 2048, settings())
    with pytest.raises(ValueError, match="trials must be an integer >= 1"):
        SearchSpace(trials=0)
    with pytest.raises(ValueError, match="lr range"):
        SearchSpace(lr_low=2.0, lr_high=1.0)
    s = settings()
    assert study.StudySettings.from_config(json.loads(json.dumps(s.to_config()))) == s
    plan = study.tuning_runs("keras", "adam", 512, s)[2]
    assert CellPlan.from_config(json.loads(json.dumps(plan.to_config()))) == plan


# --------------------------------------------------------------------------------------------
# Reports from known records
# --------------------------------------------------------------------------------------------
def test_reports_write_every_file_from_the_stored_runs(tmp_path, monkeypatch):
    monkeypatch.setattr("hvd_largebatch.bench.worker.load_mnist1d", lambda spec: None)
    run_fake_study(tmp_path, FakeRunner(), methods=("lars", "sgd"))
    store = ResultsStore(tmp_path)
    store.add_command("hvd-largebatch bench --framework torch")
    text = report.write_reports(store)
    assert text == (tmp_path / report.TABLE_FILE).read_text()
    assert "## torch: steps to 90% validation accuracy" in text
    assert "| lars | 21 [20-22] (3/3) | 21 [20-22] (3/3) |" in text
    assert "hvd-largebatch bench --framework torch" in text
    with open(tmp_path / report.CSV_FILE) as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 24 and tuple(rows[0]) == report.CSV_COLUMNS
    assert {r["phase"] for r in rows} == {"tune", "seed", "epochs"}
    summary = json.loads((tmp_path / report.SUMMARY_FILE).read_text())
    assert summary == json.loads(json.dumps(report.analyse(store.records)))
    for name in (report.PLOT_FILE, report.NOISE_PLOT_FILE):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_merges_a_study_run_elsewhere_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    from hvd_largebatch.cli import main

    monkeypatch.setattr("hvd_largebatch.bench.worker.load_mnist1d", lambda spec: None)
    run_fake_study(tmp_path / "a", FakeRunner(), methods=("lars",), batches=(256,))
    run_fake_study(tmp_path / "b", FakeRunner(), methods=("sgd",), batches=(256,))
    assert main(["bench", "--report-only", "--out", str(tmp_path / "a"), "--merge", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "merged 6 run(s)" in out and "| sgd |" in out and "| lars |" in out
    merged = ResultsStore(tmp_path / "a")
    assert len(merged.records) == 12 and (tmp_path / "a" / report.PLOT_FILE).exists()
    assert main(["bench", "--report-only", "--out", str(tmp_path / "a"), "--merge", str(tmp_path / "b")]) == 0
    assert len(ResultsStore(tmp_path / "a").records) == 12  # merging twice adds nothing
    other = ResultsStore(tmp_path / "c")
    other.adopt_settings(settings(seeds=1).to_config())
    other.save()
    assert main(["bench", "--report-only", "--out", str(tmp_path / "a"), "--merge", str(tmp_path / "c")]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path / "a"), "--merge", str(tmp_path / "b")]) == 2
    assert "--merge works with --report-only only" in capsys.readouterr().err


def test_median_counts_misses_as_larger_than_any_value():
    assert report.median_and_range([None, None, 30])["median"] is None
    assert report.median_and_range([40, None, 30, 20]) == {"median": 35.0, "min": 20, "max": 40, "reached": 3,
                                                           "runs": 4}
    assert report.median_and_range([]) == {"median": None, "min": None, "max": None, "reached": 0, "runs": 0}


# --------------------------------------------------------------------------------------------
# A real tiny study under horovodrun -np 2 (Gloo)
# --------------------------------------------------------------------------------------------
def run_bench(argv, cache_dir, timeout=600):
    env = {**os.environ, "HVD_LB_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "hvd_largebatch", "bench", *argv], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_tiny_study_under_horovodrun_writes_every_output_and_a_rerun_launches_nothing(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("hvd_lb_cache")
    out = tmp_path_factory.mktemp("study") / "results"
    argv = ["--framework", "torch", "--methods", "lars", "--batch-sizes", "64,256", "--targets", "0.3",
            "--trials", "2", "--seeds", "1", "--epochs", "1", "--horizon", "20,0", "--lr-range", "0.5,2",
            "--train-size", str(TINY.train_size), "--validation-size", "256", "--test-size", str(TINY.test_size),
            "--workers", "2", "--out", str(out)]
    proc = run_bench(argv, cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/8] torch lars     batch    64 trial 0" in proc.stdout
    assert "[8/8] torch lars     batch   256 fixed 1 epochs" in proc.stdout
    assert "[1]<" not in proc.stdout and "<stdout>" not in proc.stdout

    stored = json.loads((out / "results.json").read_text())
    records = stored["cells"]
    assert len(records) == 8 and stored["settings"]["targets"] == [0.3]
    assert {r["plan"]["study"]["phase"] for r in records} == {"tune", "seed", "epochs"}
    for record in records:
        result = record["result"]
        assert record["plan"]["world_size"] == 2 and result["steps"] >= 1 and result["trace"]
        assert result["noise_scale"], "two workers measure the noise scale"
    analysis = report.analyse(records)
    assert json.loads((out / report.SUMMARY_FILE).read_text()) == json.loads(json.dumps(analysis))
    with open(out / report.CSV_FILE) as stream:
        assert len(list(csv.DictReader(stream))) == 8
    table = (out / report.TABLE_FILE).read_text()
    assert "## torch: steps to 30% validation accuracy" in table and "| lars |" in table
    assert table.strip() in proc.stdout.replace("\r", "")
    for name in (report.PLOT_FILE, report.NOISE_PLOT_FILE):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    again = run_bench(argv, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(8 already finished)" in again.stdout and "launching" not in again.stdout
    assert json.loads((out / "results.json").read_text())["cells"] == records
