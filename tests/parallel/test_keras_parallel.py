"""hvd_largebatch.tf under ``horovodrun -np 2`` (Gloo and MPI), everything through ``model.fit``.

One launch per backend runs ``keras_worker.py``, which performs every check
on every rank (float64); expectations are computed from rank and size
(DESIGN.md, "Horovod semantics that tests must pin down"):

* ranks on rank-dependent data end with identical weights and optimizer
  state, equal to one process fitting the concatenated batches (our SGD,
  LARS, LAMB, CLARS with both estimators, Keras's SGD and Adam, and two
  backward passes per step);
* MetricAverageCallback makes the logged metrics equal across ranks, and
  equal to the mean of what the ranks log without it;
* GradualWarmupCallback's per-batch LR is the core schedule's;
* rank 0's weights, BatchNorm statistics and optimizer state reach every rank;
* BatchNorm statistics averaged over the ranks (function and callback)
  are equal on every rank and equal to the mean of the ranks' own values;
* ``jit_compile=True`` is refused with a clear error;
* rank 0 saves, every rank loads and continues exactly as without the pause.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hvd_largebatch import schedules
from launcher import run_under_horovod

WORKER = Path(__file__).with_name("keras_worker.py")
FITS = (
    "lars", "lamb", "sgd", "keras_sgd", "keras_adam", "clars_exact", "clars_microbatch",
    "accumulate2_lars", "accumulate2_lamb", "native_lars", "native_lamb",
)
# float64: only the order of the gradient summation separates the ranks from the single process
SINGLE_PROCESS_TOLERANCE = 1e-12


@pytest.fixture(scope="module", params=["gloo", "mpi"])
def results(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"keras_{request.param}")
    return run_under_horovod(WORKER, str(directory), backend=request.param, np=2)


def test_ranks_and_size(results):
    assert [(r["rank"], r["size"]) for r in results] == [(rank, len(results)) for rank in range(len(results))]


@pytest.mark.parametrize("name", FITS)
def test_fit_gives_identical_ranks_equal_to_one_process_on_the_concatenated_batches(results, name):
    per_rank = [r[f"fit/{name}"] for r in results]
    assert [r["max_abs_vs_rank0"] for r in per_rank] == [0.0] * len(results), "weights or optimizer state differ from rank 0's"
    assert [r["checksum"] for r in per_rank] == [per_rank[0]["checksum"]] * len(results)
    for result in per_rank:
        assert result["vs_single_process"] <= SINGLE_PROCESS_TOLERANCE, result
        assert result["optimizer_vs_single_process"] <= SINGLE_PROCESS_TOLERANCE, result
        assert result["moved"] > 0.1  # training really changed the weights
        assert result["updates"] == result["reference_updates"] == 8  # 2 epochs x 4 updates, passes or not


@pytest.mark.parametrize("name", ["lars", "accumulate2_lamb", "clars_exact"])
def test_gradual_warmup_lr_of_every_batch_is_the_core_schedule(results, name):
    schedule = schedules.Schedule.from_config(results[0]["schedule"])
    for result in results:
        rows = result[f"fit/{name}"]["lr_per_batch"]
        passes = 2 if name.startswith("accumulate2") else 1
        assert len(rows) == 8 * passes
        for step, lr in rows:
            assert lr == pytest.approx(schedule(step), rel=1e-15)
        # With two backward passes the optimizer step advances every second batch.
        assert [step for step, _ in rows] == [i // passes for i in range(len(rows))]
        assert result[f"fit/{name}"]["logged_epoch_lr"] == pytest.approx([schedule(3), schedule(7)], rel=1e-15)


def test_metric_average_callback_makes_logged_metrics_equal_across_ranks(results):
    averaged = [r["metric_average"]["averaged"] for r in results]
    local = [r["metric_average"]["local"] for r in results]
    assert averaged[0] == averaged[1]
    assert set(averaged[0]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert local[0] != local[1]  # rank-dependent data: without the callback each rank logs its own numbers
    for key, values in averaged[0].items():
        expected = [(a + b) / 2 for a, b in zip(local[0][key], local[1][key])]
        assert values == pytest.approx(expected, rel=1e-12), key


def test_broadcast_sends_rank_0_weights_statistics_and_optimizer_state(results):
    per_rank = [r["broadcast"] for r in results]
    assert per_rank[1]["before"] != per_rank[0]["before"]  # rank-dependent weights, slots and LR before fit
    assert [r["at_first_batch"] for r in per_rank] == [per_rank[0]["before"]] * len(results)
    assert [r["after_training_max_abs_vs_rank0"] for r in per_rank] == [0.0] * len(results)
    # BatchNorm moving statistics are local to each rank once training runs (Horovod does not average them).
    assert per_rank[1]["batchnorm_statistics_max_abs_vs_rank0"] > 0, per_rank


def test_batchnorm_statistics_are_averaged_over_the_ranks(results):
    per_rank = [r["batchnorm_average"] for r in results]
    assert [r["layers"] for r in per_rank] == [1] * len(results)  # one BatchNormalization: moving_mean and variance
    local = np.array([r["local"] for r in per_rank])
    assert np.max(np.abs(local[1] - local[0])) > 0, local  # the ranks' own statistics differ after training
    mean = local.mean(axis=0)
    for result in per_rank:
        np.testing.assert_allclose(result["averaged"], mean, rtol=1e-14, atol=1e-15)
    assert per_rank[1]["averaged"] == per_rank[0]["averaged"]
    # the callback: averaged after the last batch, so the validation in fit sees equal statistics on every rank
    assert [r["averaged_epochs"] for r in per_rank] == [1] * len(results)
    assert [r["checksum_at_validation"] for r in per_rank] == [per_rank[0]["checksum_at_validation"]] * len(results)
    assert [r["after_fit_max_abs_vs_rank0"] for r in per_rank] == [0.0] * len(results)


def test_jit_compile_true_is_refused_clearly(results):
    for result in results:
        at_train_begin, at_trace = result["jit"]["True"], result["jit"]["False"]
        assert at_train_begin is not None and "jit_compile=True cannot be used" in at_train_begin
        assert at_trace is not None and "cannot run under XLA (jit_compile=True)" in at_trace
        assert "jit_compile=False" in at_train_begin and "jit_compile=False" in at_trace


def test_rank_0_checkpoint_resumes_exactly_on_every_rank(results):
    per_rank = [r["resume"] for r in results]
    assert [r["loaded_type"] for r in per_rank] == ["DistributedOptimizer(LARS)"] * len(results)
    assert [r["max_abs_vs_rank0"] for r in per_rank] == [0.0] * len(results)
    for result in per_rank:
        assert result["vs_uninterrupted"] <= 1e-14


# ---------------------------------------------------------------- gradient noise scale (keras_noise_scale_checks.py)
@pytest.mark.parametrize("passes", [1, 2])
def test_noise_scale_monitor_is_exact_identical_on_ranks_logged_and_leaves_training_unchanged(results, passes):
    from hvd_largebatch import noise_scale

    first, second = (r[f"noise_scale/passes{passes}"] for r in results)
    assert first["batches"] == [4, 8] and first["updates"] == 4
    for result in (first, second):
        # the unbiased estimates equal the closed form of the global batch's per-example gradients
        assert len(result["raw"]) == len(result["exact"]) == 4
        for (g2, s), (exact_g2, exact_s) in zip(result["raw"], result["exact"]):
            assert g2 == pytest.approx(exact_g2, rel=1e-10)
            assert s == pytest.approx(exact_s, rel=1e-10)
        # the batch logs carry b_simple, and History's epoch value is the last one
        assert result["logged"] == pytest.approx(result["b_simple"], rel=0, nan_ok=True)
        assert result["history_b_simple"] == pytest.approx([result["b_simple"][-1]], rel=0, nan_ok=True)
        # the monitor only reads gradients: weights bit-identical with and without it
        assert result["digest"] == result["digest_off"]
    # identical on both ranks, and equal to one process fed the same norms
    assert first["b_simple"] == pytest.approx(second["b_simple"], rel=0, nan_ok=True)
    assert first["small"] == second["small"] and first["big"] == second["big"]
    estimator = noise_scale.NoiseScaleEstimator(4, 8, ema_decay=0.5)
    assert first["local"] != second["local"]
    for step, (a, b, big) in enumerate(zip(first["local"], second["local"], first["big"])):
        estimator.update([(a[0] + b[0]) / 2], big, step)
        assert first["b_simple"][step] == pytest.approx(estimator.b_simple, rel=1e-12, nan_ok=True)
    assert first["digest"] == second["digest"]
