"""Serialisation of the Keras optimizers: config round trips, and save / load / resume continuing exactly.

Every row of the shared optimizer table (``tests/optimizer_cases.py``) also
goes through a state round trip: its config through JSON, its slots and
counters through ``save_own_variables``/``load_own_variables``, then both
copies step in lockstep and must stay bit-equal.

The resume test trains a small model with ``model.fit`` (``shuffle=False``)
through an LR that changes every step and one non-finite step, saves with
``model.save()``, reloads with ``keras.models.load_model()`` and checks that
the continued run equals an uninterrupted one: optimizer slots, the previous
LR of momentum correction, the skip counter and the iteration count must all
survive.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from hvd_largebatch import schedules
from hvd_largebatch.tf import CLARS, LAMB, LARS, SGD, CLARSModel, ScheduleAdapter, callbacks, create_optimizer
from keras_adapter import keras_step, make_keras, make_variables, step_function
from optimizer_cases import CASE_IDS, CASES, initial_weights

SCHEDULE = schedules.make_schedule(0.05, 12, peak=0.2, warmup_steps=5, decay="cosine", end_lr=0.01)

# (id, optimizer factory, LR source, wrap in CLARSModel)
RESUME_CASES = [
    ("sgd-callback", lambda lr: SGD(learning_rate=lr, weight_decay=1e-3, nesterov=True), "callback", False),
    ("lars-adapter", lambda lr: LARS(learning_rate=lr, weight_decay=1e-3, trust_coefficient=0.02), "adapter", False),
    ("larc-keras-ops", lambda lr: create_optimizer("larc", learning_rate=lr, fused=False), "callback", False),
    ("lamb-adapter", lambda lr: LAMB(learning_rate=lr, weight_decay=1e-2), "adapter", False),
    ("clars-callback", lambda lr: CLARS(learning_rate=lr, trust_coefficient=0.02, chunk_size=3), "callback", True),
]


def regression_model() -> keras.Model:
    inputs = keras.Input((5,))
    x = keras.layers.Dense(8, activation="tanh", name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="batch_normalization")(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs, name="regression")


def data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 5))
    y = np.stack([x[:, 0] - 2 * x[:, 1], np.sin(x[:, 2])], axis=1)
    y[20, 0] = np.nan  # batch 2 (of 6 per epoch) has a NaN target: NaN gradients, a skipped step
    return x, y


def compiled(case, model=None):
    _, factory, lr_source, wrap = case
    keras.utils.set_random_seed(7)
    model = model or regression_model()
    if wrap:
        model = CLARSModel(model)
    lr = ScheduleAdapter(SCHEDULE) if lr_source == "adapter" else 0.1
    model.compile(optimizer=factory(lr), loss="mse", jit_compile=False)
    return model


def fit(model, case, epochs, initial_epoch=0):
    x, y = data()
    extra = [callbacks.LearningRateScheduleCallback(SCHEDULE)] if case[2] == "callback" else []
    model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0, callbacks=extra)


def inner_optimizer(model):
    return model.optimizer


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_save_load_and_resume_continue_exactly(float64, tmp_path, case):
    straight = compiled(case)
    fit(straight, case, epochs=2)

    first = compiled(case)
    fit(first, case, epochs=1)
    optimizer = first.optimizer
    assert int(optimizer.skipped_steps.numpy()) == 1  # the NaN target's step
    path = tmp_path / "model.keras"
    first.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(optimizer)
    assert loaded.optimizer.get_config() == optimizer.get_config()
    for saved, restored in zip(optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy(), err_msg=saved.path)
    assert int(loaded.optimizer.skipped_steps.numpy()) == 1
    assert float(loaded.optimizer.prev_learning_rate.numpy()) == float(optimizer.prev_learning_rate.numpy()) > 0

    fit(loaded, case, epochs=2, initial_epoch=1)
    assert int(loaded.optimizer.iterations.numpy()) == int(straight.optimizer.iterations.numpy()) == 12
    assert int(loaded.optimizer.skipped_steps.numpy()) == 2
    for a, b in zip(straight.variables, loaded.variables):
        assert np.all(np.isfinite(b.numpy())), b.path
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-12, atol=1e-15, err_msg=b.path)


CONFIG_CASES = [
    SGD(learning_rate=0.3, momentum=0.8, weight_decay=1e-4, nesterov=True, momentum_correction=False),
    LARS(learning_rate=0.2, trust_coefficient=0.01, epsilon=1e-9, clip=True, exclude_from_weight_decay=[r"bias"]),
    LARS(exclude_from_weight_decay=False, exclude_from_layer_adaptation=r"head/.*", nonfinite="raise", fused=False),
    CLARS(estimator="microbatch:4", chunk_size=5, weight_decay=2e-4),
    LAMB(learning_rate=2e-3, beta_1=0.8, beta_2=0.99, epsilon=1e-8, weight_decay=0.0, clipnorm=1.0),
    LARS(learning_rate=ScheduleAdapter(SCHEDULE)),
]


@pytest.mark.parametrize("optimizer", CONFIG_CASES, ids=[f"{type(o).__name__}-{i}" for i, o in enumerate(CONFIG_CASES)])
def test_config_round_trip_through_keras_serialisation(optimizer):
    blob = keras.saving.serialize_keras_object(optimizer)
    assert blob["registered_name"] == f"hvd_largebatch>{type(optimizer).__name__}"
    restored = keras.saving.deserialize_keras_object(blob)
    assert type(restored) is type(optimizer)
    assert restored.get_config() == optimizer.get_config()
    # The live LR is Keras's variable (float32 here); the record keeps the rest exactly.
    assert restored.core_config.replace(lr=0.0) == optimizer.core_config.replace(lr=0.0)
    assert restored.weight_decay_exclusion == optimizer.weight_decay_exclusion
    assert restored.layer_adaptation_exclusion == optimizer.layer_adaptation_exclusion


def test_keras_weight_decay_of_the_config_is_ours_and_coupled():
    config = LAMB(weight_decay=0.02).get_config()
    assert config["weight_decay"] == 0.02
    restored = LAMB.from_config(config)
    assert restored.weight_decay == 0.02 and restored.core_config.weight_decay == 0.02


def test_a_predicate_exclusion_cannot_be_serialised():
    optimizer = LARS(exclude_from_weight_decay=lambda name, shape: "bias" in name)
    with pytest.raises(ValueError, match="cannot be serialised"):
        optimizer.get_config()


def test_schedule_adapter_config_round_trip_and_values():
    adapter = ScheduleAdapter(SCHEDULE, dtype="float64")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(adapter))
    assert restored.schedule == SCHEDULE
    for step in (0, 1, 4, 5, 6, 11, 12, 13, 1000):
        assert float(restored(step)) == pytest.approx(SCHEDULE(step), rel=1e-15)


def _slots_and_counters(optimizer) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in optimizer.variables}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_table_row_state_round_trip_then_lockstep_stays_bit_equal(float64, case):
    """Every row of the shared table: 7 steps, config through JSON and slots through a store, 7 more in lockstep."""
    variables, optimizer = make_keras(case, initial_weights(case))
    apply = step_function(optimizer, variables)
    for step in range(7):
        keras_step(case, optimizer, apply, step)
    blob = json.loads(json.dumps(keras.saving.serialize_keras_object(optimizer)))
    store: dict = {}
    optimizer.save_own_variables(store)
    restored = keras.saving.deserialize_keras_object(blob)
    assert type(restored) is type(optimizer)
    assert restored.core_config == optimizer.core_config.replace(lr=restored.core_config.lr)
    other = make_variables(initial_weights(case, seed=9))  # different weights, fresh state
    for mine, theirs in zip(other, variables):
        mine.assign(theirs)
    restored.build(other)
    restored.load_own_variables(store)
    assert restored.tensor_switches == optimizer.tensor_switches
    before = _slots_and_counters(optimizer)
    after = _slots_and_counters(restored)
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    apply_restored = step_function(restored, other)
    for step in range(7, 14):
        keras_step(case, optimizer, apply, step)
        keras_step(case, restored, apply_restored, step)
    for mine, theirs in zip(other, variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=theirs.path)
    after, before = _slots_and_counters(restored), _slots_and_counters(optimizer)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
def test_lamb_weights_saved_when_the_slots_held_mu_over_one_minus_beta_load_converted(float64):
    """Earlier versions stored mu / (1 - b1) and nu / (1 - b2) and had no moment_format variable."""

    def trained():
        variables = [keras.Variable(np.arange(6.0).reshape(2, 3) / 7, name="kernel"), keras.Variable(np.ones(3), name="bias")]
        optimizer = LAMB(learning_rate=0.01, beta_1=0.8, beta_2=0.99, exclude_from_layer_adaptation=False)
        for step in range(3):
            optimizer.apply([np.sin(np.arange(6.0).reshape(2, 3) + step), np.cos(np.arange(3.0) + step)], variables)
        return optimizer, variables

    optimizer, variables = trained()
    store: dict = {}
    optimizer.save_own_variables(store)
    assert int(store[str(len(optimizer.variables) - 1)]) == 1  # moment_format is saved last
    old_store = {}
    for i, variable in enumerate(optimizer.variables[:-1]):
        value = store[str(i)]
        if any(variable is slot for slot in optimizer.first_moments):
            value = value / (1 - 0.8)
        elif any(variable is slot for slot in optimizer.second_moments):
            value = value / (1 - 0.99)
        old_store[str(i)] = value
    fresh = LAMB(learning_rate=0.01, beta_1=0.8, beta_2=0.99, exclude_from_layer_adaptation=False)
    fresh.build(variables)
    fresh.load_own_variables(old_store)
    for saved, restored in zip(optimizer.variables, fresh.variables):
        np.testing.assert_allclose(restored.numpy(), saved.numpy(), rtol=1e-14, atol=0, err_msg=saved.path)
    assert int(fresh.moment_format.numpy()) == 1



# ------------------------------------------------------------------------ the optimizer names for Keras
@pytest.mark.parametrize("name", ["lars", "larc", "clars", "lamb"])
def test_keras_name_lookup_builds_the_package_optimizer(name):
    from hvd_largebatch.tf.optimizer_factory import KERAS_NAMES

    assert name in KERAS_NAMES
    found = keras.optimizers.get(name)
    expected = create_optimizer(name)
    assert type(found) is type(expected)
    assert found.get_config() == expected.get_config()
    configured = keras.optimizers.get({"class_name": name, "config": {"learning_rate": 0.25, "weight_decay": 1e-3}})
    assert configured.get_config() == create_optimizer(name, learning_rate=0.25, weight_decay=1e-3).get_config()


def test_compile_by_name_trains_and_sgd_stays_keras_own():
    assert type(keras.optimizers.get("sgd")) is keras.optimizers.SGD  # Keras's name is left to Keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    model.compile(optimizer="larc", loss="mse")
    before = model.get_layer("dense").kernel.numpy().copy()
    x = np.arange(12, dtype="float32").reshape(4, 3) / 10
    model.fit(x, np.ones((4, 2), dtype="float32"), batch_size=4, epochs=1, verbose=0)
    assert (type(model.optimizer), model.optimizer.clip, model.optimizer.name) == (LARS, True, "larc")
    assert int(model.optimizer.iterations.numpy()) == 1
    assert float(np.max(np.abs(model.get_layer("dense").kernel.numpy() - before))) > 0
