"""Float64 parity of the Keras optimizers with the NumPy oracle (hvd_largebatch.reference), 20 steps.

One table drives every optimizer and option: Nesterov, LARC clip, decay on and
off, excluded tensors, zero-initialised tensors, an LR that changes every step
(momentum correction) and CLARS's per-example norms. Each case runs in a
``tf.function`` (as under ``model.fit``), with TensorFlow's fused kernels
(``fused=True``, the default) and with ``keras.ops`` alone; a few also run eagerly.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from hvd_largebatch import config, reference
from hvd_largebatch.tf import create_optimizer

STEPS = 20
RTOL = 1e-10

#: Keras argument names -> core record names (written out here on purpose, not imported).
CORE_NAME = {"learning_rate": "lr", "epsilon": "eps", "beta_1": "beta1", "beta_2": "beta2"}


def constant_lr(value):
    return lambda t: value


def wavy_lr(t):
    """Changes every step, starting at 0 (so the first correction is skipped)."""
    return 0.0 if t == 0 else 0.1 * (1.0 + 0.5 * math.sin(t))


def ramp_lr(t):
    return 0.02 + 0.01 * t


# (id, optimizer name, Keras kwargs, lr(t), zero-initialise the first kernel)
CASES = [
    ("sgd", "sgd", {}, constant_lr(0.1), False),
    ("sgd-decay-nesterov-ramp", "sgd", dict(weight_decay=1e-2, nesterov=True), ramp_lr, False),
    ("sgd-no-correction-wavy", "sgd", dict(momentum_correction=False), wavy_lr, False),
    ("sgd-decay-all", "sgd", dict(weight_decay=5e-3, exclude_from_weight_decay=False), constant_lr(0.05), False),
    ("lars", "lars", {}, constant_lr(0.5), False),
    ("lars-decay-ramp", "lars", dict(weight_decay=5e-4, trust_coefficient=0.02), ramp_lr, False),
    ("lars-nesterov-eps-wavy", "lars", dict(nesterov=True, epsilon=1e-3, weight_decay=1e-3), wavy_lr, False),
    ("larc-clip", "larc", dict(weight_decay=1e-3, trust_coefficient=0.05), constant_lr(0.5), False),
    ("larc-clip-nesterov-ramp", "larc", dict(nesterov=True, trust_coefficient=0.5), ramp_lr, False),
    (
        "lars-adapt-everything-zero-init",
        "lars",
        dict(weight_decay=1e-3, exclude_from_weight_decay=False, exclude_from_layer_adaptation=False),
        constant_lr(0.3),
        True,
    ),
    (
        "lars-regex-exclusions",
        "lars",
        dict(weight_decay=1e-3, exclude_from_weight_decay=[r"head/"], exclude_from_layer_adaptation=r"gamma|bias"),
        wavy_lr,
        False,
    ),
    ("lars-no-correction-ramp", "lars", dict(momentum_correction=False, weight_decay=1e-3), ramp_lr, False),
    ("lars-no-momentum", "lars", dict(momentum=0.0, weight_decay=1e-3), constant_lr(0.5), False),
    ("clars", "clars", dict(weight_decay=1e-3), constant_lr(0.5), False),
    (
        "clars-clip-adapt-everything-zero-init",
        "clars",
        dict(clip=True, trust_coefficient=0.1, exclude_from_layer_adaptation=False),
        ramp_lr,
        True,
    ),
    ("lamb", "lamb", {}, constant_lr(1e-2), False),
    ("lamb-no-decay-wavy", "lamb", dict(weight_decay=0.0, beta_1=0.8, beta_2=0.99, epsilon=1e-8), wavy_lr, False),
    (
        "lamb-adapt-everything-zero-init",
        "lamb",
        dict(weight_decay=0.05, exclude_from_weight_decay=False, exclude_from_layer_adaptation=False),
        ramp_lr,
        True,
    ),
    ("lamb-regex-exclusions", "lamb", dict(exclude_from_layer_adaptation=["dense/kernel"]), constant_lr(1e-2), False),
]


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


def reference_for(name, kwargs, paths, shapes):
    core = {CORE_NAME.get(k, k): v for k, v in kwargs.items() if not k.startswith("exclude_")}
    cfg = config.optimizer_config(name, **core)
    return reference.ReferenceOptimizer.for_tensors(
        cfg,
        paths,
        shapes,
        exclude_from_weight_decay=kwargs.get("exclude_from_weight_decay"),
        exclude_from_layer_adaptation=kwargs.get("exclude_from_layer_adaptation"),
    )


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected)
    scale = max(float(np.linalg.norm(expected)), 1e-30)
    return float(np.linalg.norm(np.asarray(actual) - expected)) / scale


def run_case(
    name, kwargs, lr_of_step, zero_first_kernel, *, graph: bool, fused: bool = True, nan_at_step: int | None = None
):
    model = tiny_model(zero_first_kernel)
    variables = model.trainable_variables
    paths = [v.path for v in variables]
    shapes = [tuple(v.shape) for v in variables]
    optimizer = create_optimizer(name, learning_rate=lr_of_step(0), fused=fused, **kwargs)
    optimizer.build(variables)
    oracle = reference_for(name, kwargs, paths, shapes)
    params = [v.numpy().copy() for v in variables]
    rng = np.random.default_rng(1)
    is_clars = name == "clars"

    def apply(grads):
        optimizer.apply(grads, variables)

    step_fn = tf.function(apply) if graph else apply
    for t in range(STEPS):
        grads = [rng.normal(size=s) * (1.0 + i) for i, s in enumerate(shapes)]
        if t == nan_at_step:
            grads[2][0] = np.nan
        lr = lr_of_step(t)
        norms = None
        if is_clars:
            norms = [float(np.linalg.norm(g)) * (1.0 + 0.5 * rng.random()) for g in grads]
            norms[1] = 0.0  # s = 0 gives ratio 1
            optimizer.set_grad_norms(dict(zip(paths, norms)))
        optimizer.learning_rate = lr
        step_fn([tf.constant(g) for g in grads])
        params = oracle.step(params, grads, lr, grad_norms=norms)
    return optimizer, variables, oracle, params


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "keras_ops"])
@pytest.mark.parametrize("case_id, name, kwargs, lr_of_step, zero_first_kernel", CASES, ids=[c[0] for c in CASES])
def test_float64_parity_with_the_oracle_over_20_steps(
    float64, case_id, name, kwargs, lr_of_step, zero_first_kernel, fused
):
    optimizer, variables, oracle, expected = run_case(
        name, kwargs, lr_of_step, zero_first_kernel, graph=True, fused=fused
    )
    for v, e in zip(variables, expected):
        assert relative_error(v.numpy(), e) <= RTOL, v.path
    # Optimizer state agrees too: velocities or moments, and the recorded LR.
    if name == "lamb":  # the slots hold mu and nu, as torch's exp_avg and exp_avg_sq
        slots = [(optimizer.first_moments, oracle.state["mu"]), (optimizer.second_moments, oracle.state["nu"])]
    else:  # the slot holds m = -v (Keras's sign convention)
        slots = [(optimizer.momentums, [-v for v in oracle.state["velocity"]])]
    for ours, theirs in slots:
        for v, e in zip(ours, theirs):
            assert relative_error(v.numpy(), e) <= RTOL, v.path
    assert float(optimizer.prev_learning_rate.numpy()) == pytest.approx(oracle.state["prev_lr"], rel=1e-15)
    assert int(optimizer.skipped_steps.numpy()) == 0


@pytest.mark.parametrize("case_index", [1, 6, 14, 17], ids=lambda i: CASES[i][0])
def test_eager_apply_matches_the_oracle_too(float64, case_index):
    _, name, kwargs, lr_of_step, zero_first_kernel = CASES[case_index]
    _, variables, _, expected = run_case(name, kwargs, lr_of_step, zero_first_kernel, graph=False)
    for v, e in zip(variables, expected):
        assert relative_error(v.numpy(), e) <= RTOL, v.path


@pytest.mark.parametrize("case_index", [2, 6, 13, 17], ids=lambda i: CASES[i][0])
@pytest.mark.parametrize("graph, fused", [(True, True), (False, True), (True, False)], ids=["graph", "eager", "keras_ops"])
def test_a_nonfinite_step_is_skipped_counted_and_leaves_no_trace(float64, case_index, graph, fused):
    """NaN in one gradient at step 7: nothing moves, the skip is counted, and the run continues as the oracle's."""
    _, name, kwargs, lr_of_step, zero_first_kernel = CASES[case_index]
    optimizer, variables, oracle, expected = run_case(
        name, kwargs, lr_of_step, zero_first_kernel, graph=graph, fused=fused, nan_at_step=7
    )
    assert oracle.state["skipped"] == 1
    assert int(optimizer.skipped_steps.numpy()) == 1
    assert int(optimizer.iterations.numpy()) == STEPS
    for v, e in zip(variables, expected):
        assert np.all(np.isfinite(v.numpy()))
        assert relative_error(v.numpy(), e) <= RTOL, v.path
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
