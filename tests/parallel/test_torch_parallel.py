"""hvd_largebatch.torch_impl under ``horovodrun -np 2`` (Gloo and MPI): averaging, identical ranks, exact broadcast.

One launch per backend runs ``torch_worker.py``, which performs every check on
every rank; expectations are computed from rank and size (DESIGN.md,
"Horovod semantics that tests must pin down").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher import run_under_horovod

WORKER = Path(__file__).with_name("torch_worker.py")
NAMES = ("sgd", "lars", "larc", "clars", "lamb")
# float64; only the order of the gradient summation differs from the single process
SINGLE_PROCESS_TOLERANCE = 1e-9


@pytest.fixture(scope="module", params=["gloo", "mpi"])
def results(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"torch_{request.param}")
    return run_under_horovod(WORKER, str(directory), backend=request.param, np=2)


def test_ranks_and_size(results):
    assert [(r["rank"], r["size"]) for r in results] == [(rank, len(results)) for rank in range(len(results))]


@pytest.mark.parametrize("key", [f"average/{n}" for n in NAMES] + [f"accumulate2/{n}" for n in ("lars", "clars", "lamb")]
                         + [f"numba/{n}" for n in ("lars", "lamb")])
def test_ranks_identical_and_equal_to_one_process_on_the_concatenated_batch(results, key):
    per_rank = [r[key] for r in results]
    assert [r["max_abs_vs_rank0"] for r in per_rank] == [0.0] * len(results), "weights or optimizer state differ from rank 0's"
    assert [r["checksum"] for r in per_rank] == [per_rank[0]["checksum"]] * len(results)
    for result in per_rank:
        assert result["vs_single_process"] <= SINGLE_PROCESS_TOLERANCE, result
        assert result["moved"] > 1e-4, result  # training really changed the weights
        assert result["lr"] == result["single_lr"], result
        assert result["skipped"] == 0, result


def test_batchnorm_model_keeps_parameters_and_state_identical(results):
    per_rank = [r["bn_model"] for r in results]
    assert [r["params_and_state_max_abs_vs_rank0"] for r in per_rank] == [0.0] * len(results)
    # BatchNorm running statistics are local (Horovod does not synchronise them): every other rank differs
    assert [r["buffers_max_abs_vs_rank0"] > 0 for r in per_rank[1:]] == [True] * (len(results) - 1), per_rank


def test_average_batchnorm_statistics_gives_every_rank_the_mean_of_the_ranks(results):
    per_rank = [r["bn_average"] for r in results]
    assert [r["layers"] for r in per_rank] == [1] * len(results)
    assert per_rank[0]["before"]["running_mean"] != per_rank[1]["before"]["running_mean"]
    assert [r["before"]["num_batches_tracked"] for r in per_rank] == [2 + 2 * rank for rank in range(len(results))]
    for key in ("running_mean", "running_var"):
        assert [r["after"][key] for r in per_rank] == [per_rank[0]["after"][key]] * len(results)  # bit-identical
        mean = [sum(values) / len(results) for values in zip(*(r["before"][key] for r in per_rank))]
        assert per_rank[0]["after"][key] == pytest.approx(mean, rel=1e-12, abs=1e-15)
    assert [r["after"]["num_batches_tracked"] for r in per_rank] == [3] * len(results)  # mean of 2 and 4


def test_clars_exact_equals_microbatch_with_k_equal_to_batch_and_is_averaged(results):
    for result in results:
        assert result["clars_exact_vs_microbatch"] <= 1e-10
    assert results[0]["clars_exact"] == results[1]["clars_exact"]  # the global mean, same on both
    for name, value in results[0]["clars_exact"].items():
        local_mean = sum(r["clars_local"][name] for r in results) / len(results)
        assert value == pytest.approx(local_mean, rel=1e-12)
    assert results[0]["clars_local"] != results[1]["clars_local"]


def test_distributed_optimizer_keeps_hyperparameters_and_switches(results):
    for result in results:
        settings = result["settings"]
        assert settings["groups_after"] == settings["groups_before"]
        assert settings["switches_after"] == settings["switches_before"]
        for mro in settings["classes"]:  # ours and Horovod's own wrapper
            assert "CLARS" in mro, mro
        assert settings["horovod_adapt_after"] == settings["horovod_adapt_before"] == [False, True, True, True, True, True]
        assert settings["horovod_backward_passes"] == 2


@pytest.mark.parametrize("root", [0, 1])
@pytest.mark.parametrize("fresh", [0, 1], ids=["root-trained", "root-fresh"])
def test_broadcast_state_gives_every_rank_exactly_the_roots_weights_and_state(results, root, fresh):
    key = f"broadcast/root{root}/fresh{fresh}"
    per_rank = [r[key] for r in results]
    assert [c["weights_max_abs_vs_root_before"] for c in per_rank] == [0.0] * len(results)
    root_before = per_rank[root]["root_state_checksum_before"]
    assert [c["state_checksum_after"] for c in per_rank] == [root_before] * len(results)
    assert [c["skipped_steps"] for c in per_rank] == [root] * len(results)  # the root's skip count (it was its rank)
    if fresh:
        assert all(c["state_entries"] > 0 for c in per_rank), per_rank  # after the synchronised step
    assert [c["after_step_max_abs_vs_rank0"] for c in per_rank] == [0.0] * len(results)


def test_nonfinite_gradient_on_one_rank_is_skipped_on_every_rank(results):
    assert [r["nonfinite_max_abs_change"] for r in results] == [0.0] * len(results)
    assert [r["nonfinite_skipped"] for r in results] == [1] * len(results)
    assert [r["nonfinite_weight_count"] for r in results] == [0] * len(results)


def test_checkpoint_written_by_rank0_resumes_exactly_on_every_rank(results):
    assert [r["checkpoint_wrote"] for r in results] == [rank == 0 for rank in range(len(results))]
    for result in results:
        assert result["checkpoint_info"] == {"step": 4, "extra": {"epoch": 2}}
        assert result["checkpoint_max_abs_vs_uninterrupted"] == 0.0
        assert result["checkpoint_lr"][0] == result["checkpoint_lr"][1]


# ---------------------------------------------------------------- gradient noise scale (torch_noise_scale_checks.py)
@pytest.mark.parametrize("key", ["noise_scale/package/passes1", "noise_scale/horovod/passes2"])
def test_noise_scale_monitor_is_exact_identical_on_ranks_and_leaves_training_unchanged(results, key):
    from hvd_largebatch import noise_scale

    first, second = (r[key] for r in results)
    assert first["batches"] == [4, 8]  # b_s = 4 examples per rank (2 passes of 2 or 1 of 4), b_B = 2 ranks x 4
    # the unbiased estimates equal the closed form of the global batch's per-example gradients
    for result in (first, second):
        for (g2, s), (exact_g2, exact_s) in zip(result["raw"], result["exact"]):
            assert g2 == pytest.approx(exact_g2, rel=1e-10)
            assert s == pytest.approx(exact_s, rel=1e-10)
    # identical on both ranks, and equal to one process fed the same local norms
    assert first["b_simple"] == second["b_simple"]
    assert first["small"] == second["small"] and first["big"] == second["big"]
    assert first["local"] != second["local"]
    estimator = noise_scale.NoiseScaleEstimator(4, 8, ema_decay=0.5)
    for step, (a, b, big) in enumerate(zip(first["local"], second["local"], first["big"])):
        estimator.update([(a[0] + b[0]) / 2], big, step)
        assert first["b_simple"][step] == pytest.approx(estimator.b_simple, rel=1e-12, nan_ok=True)
    assert first["g2"] == pytest.approx(estimator.g2, rel=1e-12)
    # the monitor only reads gradients: weights bit-identical with and without it
    for result in (first, second):
        assert result["digest"] == result["digest_off"]
    assert first["digest"] == second["digest"]


def test_noise_scale_monitor_measures_every_interval_steps(results):
    for result in results:
        assert result["noise_scale/interval2"] == {"updates": 3, "measured": 3}  # steps 0, 2, 4 of 5
