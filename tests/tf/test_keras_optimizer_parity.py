"""Float64 parity of the Keras optimizers with the NumPy oracle (hvd_largebatch.reference), 20 steps.

The shared table (``tests/optimizer_cases.py``, core spelling; the same rows
as the torch tests) drives every optimizer and option: Nesterov, LARC clip,
decay on and off, excluded tensors, zero-initialised tensors, LRs that change
every step (momentum correction) and CLARS's per-example norms.
``keras_adapter`` turns each row into Keras arguments. Each row runs in a
``tf.function`` (as under ``model.fit``) on each of the three paths of the
update: ``fused="native"`` (the package's CPU kernels, ``fused_kernels.cc``),
``fused=True`` (the default: TensorFlow's kernels, the path of GPUs, XLA and
machines without a compiler), and ``keras.ops`` alone (``fused=False``); one
row per optimizer also runs
eagerly and with a non-finite gradient.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from hvd_largebatch.tf import create_optimizer
from keras_adapter import PATHS, keras_step, make_keras, state_in_core_names, step_function, weights_of
from optimizer_cases import (
    CASE_IDS,
    CASES,
    STEPS,
    TOLERANCE,
    gradients,
    initial_weights,
    make_reference,
    one_case_per_optimizer,
    parity_errors,
    reference_step,
)

#: One row per optimizer whose LR changes every step (and hits 0 once).
CHANGING_LR = one_case_per_optimizer("changing-lr")


def tiny_model(zero_first_kernel: bool) -> keras.Model:
    """Dense -> BatchNorm -> Dense: kernels, biases (zero-initialised) and BN scale/offset."""
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="batch_normalization")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    if zero_first_kernel:
        model.get_layer("dense").kernel.assign(np.zeros((6, 5)))
    return model


#: The update's paths: name -> (fused argument, whether our CPU kernels are on).
PATHS_OF_THE_UPDATE = {"native": ("native", True), "tf_kernels": (True, False), "keras_ops": (False, False)}


@pytest.fixture(params=list(PATHS_OF_THE_UPDATE))
def update_path(request):
    """Each path of the update, by name."""
    return request.param


def run_case(case, *, graph: bool, fused: bool = True, nan_at_step: int | None = None):
    """Steps the Keras optimizer and the oracle side by side; returns (optimizer, variables, oracle, expected)."""
    weights = initial_weights(case)
    variables, optimizer = make_keras(case, weights, fused=fused)
    oracle = make_reference(case, PATHS)
    apply = step_function(optimizer, variables, graph=graph)
    for step in range(STEPS):
        grads = gradients(step)
        if step == nan_at_step:
            grads = {**grads, "layer1.0.bn1.weight": grads["layer1.0.bn1.weight"].copy()}
            grads["layer1.0.bn1.weight"][0] = np.nan
        keras_step(case, optimizer, apply, step, grads)
        weights = reference_step(case, oracle, weights, step, grads)
    return optimizer, variables, oracle, weights


def assert_matches_the_oracle(case, optimizer, variables, oracle, expected):
    errors = parity_errors(case, weights_of(variables), state_in_core_names(case, optimizer), oracle, expected)
    worst = {k: v for k, v in errors.items() if v > TOLERANCE}
    assert not worst, f"relative errors above {TOLERANCE:g}: {worst}"
    assert float(optimizer.prev_learning_rate.numpy()) == pytest.approx(oracle.state["prev_lr"], rel=1e-15)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float64_parity_with_the_oracle_over_20_steps(float64, case, update_path):
    fused, native = PATHS_OF_THE_UPDATE[update_path]
    optimizer, variables, oracle, expected = run_case(case, graph=True, fused=fused)
    assert optimizer._native_kernels == native, f"the step did not take the {update_path} path"
    switches = [(optimizer.tensor_switches[p]["decay"], optimizer.tensor_switches[p]["adapt"]) for p in PATHS]
    expected_switches = list(zip(oracle.decay, oracle.adapt))
    if not case.adaptive:  # SGD reports no layer adaptation
        switches, expected_switches = [d for d, _ in switches], [d for d, _ in expected_switches]
    assert switches == expected_switches, "per-tensor (decay, adapt) switches differ from the oracle's"
    assert_matches_the_oracle(case, optimizer, variables, oracle, expected)
    assert int(optimizer.skipped_steps.numpy()) == oracle.state["skipped"] == 0
    assert int(optimizer.iterations.numpy()) == STEPS


@pytest.mark.parametrize("case", CHANGING_LR, ids=[c.id for c in CHANGING_LR])
def test_eager_apply_matches_the_oracle_too(float64, case):
    optimizer, variables, oracle, expected = run_case(case, graph=False)
    assert_matches_the_oracle(case, optimizer, variables, oracle, expected)


@pytest.mark.parametrize("case", CHANGING_LR, ids=[c.id for c in CHANGING_LR])
@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
def test_a_nonfinite_step_is_skipped_counted_and_leaves_no_trace(float64, case, graph, update_path):
    """NaN in one gradient at step 7: nothing moves, the skip is counted, and the run continues as the oracle's."""
    fused, native = PATHS_OF_THE_UPDATE[update_path]
    optimizer, variables, oracle, expected = run_case(case, graph=graph, fused=fused, nan_at_step=7)
    assert optimizer._native_kernels == native
    assert oracle.state["skipped"] == 1
    assert int(optimizer.skipped_steps.numpy()) == 1
    assert int(optimizer.iterations.numpy()) == STEPS
    for v in variables:
        assert np.all(np.isfinite(v.numpy())), v.path
    assert_matches_the_oracle(case, optimizer, variables, oracle, expected)
    for slot in optimizer.variables:
        assert np.all(np.isfinite(slot.numpy())), slot.path


def test_the_skipped_step_changes_no_weight_and_no_slot(float64):
    model = tiny_model(False)
    variables = model.trainable_variables
    optimizer = create_optimizer("lars", learning_rate=0.1, weight_decay=1e-3)
    grads = [np.ones(v.shape) for v in variables]
    optimizer.apply(grads, variables)
    before = [v.numpy().copy() for v in variables + optimizer.variables]
    grads[-1][0] = np.inf
    tf.function(lambda g: optimizer.apply(g, variables))([tf.constant(g) for g in grads])
    after = [v.numpy() for v in variables + optimizer.variables]
    changed = [
        v.path for v, b, a in zip(variables + optimizer.variables, before, after) if not np.array_equal(b, a)
    ]
    # Only the iteration counter and the skip counter move.
    assert sorted(changed) == sorted([optimizer._iterations.path, optimizer.skipped_steps.path])


@pytest.mark.parametrize("name", ["sgd", "lars", "lamb"])
def test_nonfinite_raise_policy(float64, name):
    model = tiny_model(False)
    variables = model.trainable_variables
    grads = [np.ones(v.shape) for v in variables]
    grads[0][0, 0] = np.nan
    optimizer = create_optimizer(name, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite"):
        optimizer.apply(grads, variables)
    optimizer = create_optimizer(name, nonfinite="raise")
    optimizer.build(variables)
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        tf.function(lambda g: optimizer.apply(g, variables))([tf.constant(g) for g in grads])


def test_switches_follow_the_default_rule_on_variable_paths(float64):
    model = tiny_model(False)
    optimizer = create_optimizer("lars")
    optimizer.build(model.trainable_variables)
    switches = optimizer.tensor_switches
    assert switches["dense/kernel"] == {"decay": True, "adapt": True}
    assert switches["head/kernel"] == {"decay": True, "adapt": True}
    for path in ("dense/bias", "head/bias", "batch_normalization/gamma", "batch_normalization/beta"):
        assert switches[path] == {"decay": False, "adapt": False}, path
    sgd = create_optimizer("sgd")
    sgd.build(model.trainable_variables)
    assert not any(s["adapt"] for s in sgd.tensor_switches.values())


def test_keras_exclude_from_weight_decay_method_replaces_the_rule(float64):
    model = tiny_model(False)
    optimizer = create_optimizer("lars", weight_decay=1e-3)
    optimizer.exclude_from_weight_decay(var_names=["head"])
    optimizer.build(model.trainable_variables)
    switches = optimizer.tensor_switches
    assert switches["dense/kernel"]["decay"] and switches["dense/bias"]["decay"]
    assert not switches["head/kernel"]["decay"]
    with pytest.raises(ValueError, match="before the optimizer is built"):
        optimizer.exclude_from_weight_decay(var_names=["dense"])


def test_keras_decoupled_weight_decay_is_never_applied(float64):
    """With a zero gradient and lr > 0, coupled decay moves w by lr * beta * w exactly once."""
    w = keras.Variable(np.full((3, 3), 2.0), name="kernel")
    optimizer = create_optimizer("sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.5)
    optimizer.apply([np.zeros((3, 3))], [w])
    np.testing.assert_allclose(w.numpy(), 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-15)
    assert optimizer.get_config()["weight_decay"] == 0.5
