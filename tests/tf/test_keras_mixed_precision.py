"""Keras mixed precision in one process: which combinations are refused (and how), the wrapper's face, bfloat16.

The loss-scale decision on averaged gradients is tested under ``horovodrun``
in tests/parallel/test_mixed_precision_parallel.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras.src.backend.common import global_state

from hvd_largebatch.tf import (
    LAMB,
    LARS,
    SGD,
    DistributedLossScaleOptimizer,
    DistributedOptimizer,
    create_optimizer,
)


@pytest.fixture
def policy():
    """Sets a global dtype policy for the test and restores the previous one (without creating one)."""
    previous = global_state.get_global_attribute("dtype_policy", None)
    yield keras.mixed_precision.set_global_policy
    global_state.set_global_attribute("dtype_policy", previous)


def small_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(16, activation="tanh", name="dense")(inputs)
    outputs = keras.layers.Dense(3, name="head", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
    return x, y


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_compile_refuses_keras_loss_scaling_around_distributed_optimizer_under_mixed_float16(policy):
    policy("mixed_float16")
    model = small_model()
    with pytest.raises(ValueError, match=r"keras.optimizers.LossScaleOptimizer cannot wrap .*DistributedLossScaleOptimizer"):
        model.compile(optimizer=DistributedOptimizer(LARS()), loss=LOSS)
    with pytest.raises(ValueError, match=r"other ranks wait for it forever"):
        keras.optimizers.LossScaleOptimizer(DistributedOptimizer(LAMB()))


def test_distributed_loss_scale_optimizer_is_kept_by_compile_and_round_trips(policy):
    policy("mixed_float16")
    model = small_model()
    optimizer = DistributedLossScaleOptimizer(LARS(learning_rate=0.3), initial_scale=2.0**10, dynamic_growth_steps=7)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    assert model.optimizer is optimizer  # not wrapped a second time
    assert type(optimizer.inner_optimizer) is DistributedOptimizer  # a plain optimizer gets the averaging
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.3)
    assert float(optimizer.scale_loss(1.0)) == 2.0**10
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(optimizer))
    assert type(restored) is DistributedLossScaleOptimizer
    assert type(restored.inner_optimizer.inner_optimizer) is LARS
    assert (restored.initial_scale, restored.dynamic_growth_steps) == (2.0**10, 7)
    assert restored.get_config() == optimizer.get_config()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DistributedLossScaleOptimizer(LARS(), initial_scale=0), r"initial_scale must be > 0, got 0"),
        (lambda: DistributedLossScaleOptimizer(LARS(), initial_scale="big"), r"initial_scale must be a .*number"),
        (lambda: DistributedLossScaleOptimizer(LARS(), dynamic_growth_steps=0), r"dynamic_growth_steps must be an integer >= 1, got 0"),
        (lambda: DistributedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer(LARS())),
         r"inner_optimizer already does loss scaling"),
        (lambda: DistributedLossScaleOptimizer("lars"), r"inner_optimizer must be a keras.optimizers.Optimizer"),
    ],
    ids=["scale-zero", "scale-str", "growth-zero", "inner-loss-scale", "inner-str"],
)
def test_distributed_loss_scale_optimizer_bad_inputs(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["sgd", "lars", "lamb"])
def test_half_precision_variables_are_refused_before_the_first_step(policy, half, name):
    policy(half)
    model = small_model()
    model.compile(optimizer=create_optimizer(name, learning_rate=0.1), loss=LOSS, jit_compile=False)
    before = [v.numpy().copy() for v in model.trainable_variables]
    x, y = data()
    with pytest.raises(ValueError, match=rf"of dtype {half}; variables must be float32 or float64 .*'mixed_{half}'"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, model.trainable_variables))


@pytest.mark.parametrize("make", [lambda: LARS(learning_rate=2.0, trust_coefficient=0.02), lambda: LAMB(learning_rate=0.02),
                                  lambda: SGD(learning_rate=0.3)], ids=["lars", "lamb", "sgd"])
def test_mixed_bfloat16_trains_with_float32_variables_and_slots(policy, make):
    policy("mixed_bfloat16")
    model = small_model()
    optimizer = make()
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    x, y = data()
    history = model.fit(x, y, batch_size=16, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.optimizer is optimizer  # no loss scaling under bfloat16
    for variable in model.trainable_variables + [v for v in optimizer.variables if "float" in str(v.dtype)]:
        assert keras.backend.standardize_dtype(variable.dtype) == "float32"
        assert np.isfinite(variable.numpy()).all()
