"""Mixed precision under ``horovodrun -np 2`` (Gloo): one launch per framework, every check on every rank.

torch (``mixed_precision_torch_worker.py``), for SGD, LARS, LARC, CLARS, LAMB:
GradScaler in Horovod's synchronize / unscale_ / skip_synchronize order with
an Inf on rank 1 only (skipped on both ranks, same scale, equal to the run
that leaves the step out); autocast bfloat16 against fp32; fp16 wire
compression; float16 parameters.

Keras (``mixed_precision_keras_worker.py``): ``mixed_float16`` with
``DistributedLossScaleOptimizer`` where only rank 1's batch overflows (no
hang: the launch has a timeout; skipped on both ranks; same loss scale;
identical finite weights), the unscaled gradients reaching LARS (against a
float32 run), ``mixed_bfloat16`` training, the refusal of Keras's own
LossScaleOptimizer around ``DistributedOptimizer``, and fp16 wire
compression with every optimizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher import run_under_horovod

HERE = Path(__file__).parent
NAMES = ("sgd", "lars", "larc", "clars", "lamb")
KERAS_NAMES = ("sgd", "lars", "clars", "lamb")
TIMEOUT = 900  # a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def torch_results():
    return run_under_horovod(HERE / "mixed_precision_torch_worker.py", np=2, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def keras_results():
    return run_under_horovod(HERE / "mixed_precision_keras_worker.py", np=2, timeout=TIMEOUT)


def _same_on_both_ranks(results, key):
    first, second = (r[key] for r in results)
    assert first["digest"] == second["digest"], f"{key}: ranks differ"
    return first, second


# ------------------------------------------------------------------------------------------------- torch
@pytest.mark.parametrize("name", NAMES)
def test_torch_grad_scaler_skips_a_step_that_overflows_on_one_rank_on_every_rank(torch_results, name):
    first, second = _same_on_both_ranks(torch_results, f"scaler/{name}")
    assert first["scales"] == second["scales"]
    assert first["scales"][2] == 2.0**12 and first["scales"][3] == 2.0**11, first["scales"]  # halved once, at step 3
    for result in (first, second):
        assert result["nonfinite"] == 0
        assert result["optimizer_skips"] == 0  # the scaler skipped it; the optimizer never saw the Inf
        # the skipped step is the step left out (the scaler's unscaling is exact: powers of two)
        assert result["vs_step_left_out"] <= 1e-6, result
        assert result["moved_by_poisoned_step"] > 1e-3  # leaving the step out does change the weights


@pytest.mark.parametrize("name", NAMES)
def test_torch_autocast_bfloat16_with_grad_scaler_matches_fp32(torch_results, name):
    first, _ = _same_on_both_ranks(torch_results, f"autocast/{name}")
    assert first["nonfinite"] == 0
    assert first["vs_fp32"] <= 0.05 * first["fp32_moved"], first  # bfloat16 rounding in the forward pass only


@pytest.mark.parametrize("name", NAMES)
def test_torch_fp16_wire_compression(torch_results, name):
    first, _ = _same_on_both_ranks(torch_results, f"compression/{name}")
    assert first["nonfinite"] == 0
    assert first["vs_uncompressed"] <= 0.02 * first["moved"], first


@pytest.mark.parametrize("name", NAMES)
def test_torch_float16_parameters_train_identically_on_every_rank(torch_results, name):
    first, _ = _same_on_both_ranks(torch_results, f"half/{name}")
    assert first["nonfinite"] == 0 and first["skips"] == 0
    assert first["moved"] > 1e-3
    assert first["state_dtypes"] == ["torch.float32"]


# ------------------------------------------------------------------------------------------------- Keras
@pytest.mark.parametrize("key", ["overflow/lars", "overflow/lamb_accumulate2"])
def test_keras_mixed_float16_overflow_on_one_rank_is_skipped_on_every_rank(keras_results, key):
    first, second = _same_on_both_ranks(keras_results, key)
    for result in (first, second):
        assert result["rank_overflowed_locally"] == [False, True]
        assert result["updates"] == result["expected_updates"] - 1, result  # one update skipped, on both
        assert result["loss_scale"] == result["initial_scale"] / 2, result
        assert result["nonfinite"] == 0
        assert result["variable_dtypes"] == ["float32"] and result["slot_dtypes"] == ["float32"]
    assert first["loss_scale"] == second["loss_scale"]


def test_keras_mixed_float16_gives_the_inner_optimizer_unscaled_gradients(keras_results):
    first, _ = _same_on_both_ranks(keras_results, "unscaled/lars")
    # float16 compute against float32 compute; scaled gradients (x 2**15) would move the biases 2**15 times as far
    assert first["vs_float32"] <= 0.05 * first["float32_moved"], first
    assert first["loss_scale"] == first["initial_scale"]


def test_keras_mixed_bfloat16_trains(keras_results):
    first, _ = _same_on_both_ranks(keras_results, "bfloat16/lamb")
    assert first["last_loss"] < 0.8 * first["first_loss"], first
    assert first["optimizer_type"] == "DistributedOptimizer"  # no loss scaling under bfloat16
    assert first["nonfinite"] == 0
    assert first["variable_dtypes"] == ["float32"] and first["slot_dtypes"] == ["float32"]


def test_keras_loss_scale_optimizer_around_distributed_optimizer_is_refused_at_compile(keras_results):
    for result in keras_results:
        assert "keras.optimizers.LossScaleOptimizer cannot wrap" in result["refused"]
        assert "DistributedLossScaleOptimizer" in result["refused"]


@pytest.mark.parametrize("name", KERAS_NAMES)
def test_keras_fp16_wire_compression(keras_results, name):
    first, _ = _same_on_both_ranks(keras_results, f"compression/{name}")
    assert first["nonfinite"] == 0
    assert first["vs_uncompressed"] <= 0.02 * first["moved"], first
