"""Sanity of the float64 oracle (hvd_largebatch/reference.py) against ALGORITHMS.md, written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hvd_largebatch import config, reference, schedules

RNG_SEED = 1234


def random_tensors(rng, shapes, scale=1.0):
    return [scale * rng.standard_normal(shape) for shape in shapes]


# --------------------------------------------------------------------------
# Zero tensors: ratio 1
# --------------------------------------------------------------------------
def test_trust_ratio_is_one_unless_both_norms_positive():
    assert reference.trust_ratio(3.0, 2.0) == 1.5
    assert reference.trust_ratio(0.0, 2.0) == 1.0
    assert reference.trust_ratio(2.0, 0.0) == 1.0
    assert reference.trust_ratio(0.0, 0.0) == 1.0


@pytest.mark.parametrize("name", ["lars", "larc", "clars"])
def test_zero_initialised_tensor_trains_with_ratio_one(name):
    cfg = config.optimizer_config(name, lr=0.5, weight_decay=1e-3, trust_coefficient=0.01)
    opt = reference.ReferenceOptimizer(cfg, decay=[True], adapt=[True])
    g = np.arange(1.0, 7.0).reshape(2, 3)
    norms = [7.0] if name == "clars" else None
    (w,) = opt.step([np.zeros((2, 3))], [g], lr=0.5, grad_norms=norms)
    # lambda = 1 (||w|| = 0) and the decay term is 0: w = -lr * g (LARC: min(lr, 1) = lr).
    np.testing.assert_array_equal(w, -0.5 * g)
    assert reference.lars_local_lr(
        np.zeros(3), 5.0, trust_coefficient=0.01, weight_decay=0.1, eps=0.0, decay=True, adapt=True
    ) == 1.0


def test_zero_gradient_gives_ratio_one_and_pure_weight_decay():
    cfg = config.optimizer_config("lars", momentum=0.0, weight_decay=0.01, trust_coefficient=0.001)
    opt = reference.ReferenceOptimizer(cfg, decay=[True], adapt=[True])
    w0 = np.array([[3.0, 4.0]])
    (w,) = opt.step([w0], [np.zeros((1, 2))], lr=0.1)
    np.testing.assert_allclose(w, w0 - 0.1 * 1.0 * 0.01 * w0, rtol=1e-15)


def test_lamb_zero_tensor_ratio_one():
    cfg = config.optimizer_config("lamb", eps=0.0, weight_decay=0.01)
    opt = reference.ReferenceOptimizer(cfg, decay=[True], adapt=[True])
    (w,) = opt.step([np.zeros(2)], [np.array([0.5, -2.0])], lr=0.1)
    np.testing.assert_allclose(w, [-0.1, 0.1], rtol=1e-12)  # u = sign(g), r = 1


# --------------------------------------------------------------------------
# Excluded tensors: plain momentum SGD (LARS/LARC) or plain Adam direction (LAMB)
# --------------------------------------------------------------------------
NAMES = ["block.conv.weight", "block.conv.bias", "block.bn1.weight", "head.dense/kernel"]
SHAPES = [(4, 3, 3), (4,), (4,), (6, 4)]
LRS = [0.05, 0.2, 0.4, 0.4, 0.3, 0.1]  # LR changes, so momentum correction is exercised too


@pytest.mark.parametrize("clip", [False, True])
def test_excluded_tensors_get_plain_momentum_sgd(clip):
    rng = np.random.default_rng(RNG_SEED)
    cfg = config.optimizer_config("lars", momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02, clip=clip)
    opt = reference.ReferenceOptimizer.for_tensors(cfg, NAMES, SHAPES)
    assert opt.decay == [True, False, False, True] and opt.adapt == [True, False, False, True]
    params = random_tensors(rng, SHAPES)
    # Plain momentum SGD (each tensor's own decay switch, no trust ratio) for EVERY tensor.
    plain = [(p.copy(), np.zeros(p.shape)) for p in params]
    prev = None
    for lr in LRS:
        grads = random_tensors(rng, SHAPES, scale=3.0)
        params = opt.step(params, grads, lr=lr)
        for i, (w, v) in enumerate(plain):
            if prev is not None:
                v = v * (lr / prev)
            d = grads[i] + 5e-4 * w if opt.decay[i] else grads[i]
            v = 0.9 * v + lr * d
            plain[i] = (w - v, v)
        prev = lr
    for i in (1, 2):  # excluded: exactly plain SGD
        np.testing.assert_allclose(params[i], plain[i][0], rtol=1e-13, atol=1e-15)
    for i in (0, 3):  # adapted: the trust ratio makes them differ (so the check above can fail)
        assert not np.allclose(params[i], plain[i][0], rtol=1e-6)


def test_lamb_excluded_tensor_gets_plain_adam_direction():
    rng = np.random.default_rng(RNG_SEED)
    cfg = config.optimizer_config("lamb", weight_decay=0.1)
    opt = reference.ReferenceOptimizer.for_tensors(cfg, ["fc.weight", "fc.bias"], [(3, 2), (3,)])
    params = random_tensors(rng, [(3, 2), (3,)])
    w, mu, nu = params[1].copy(), np.zeros(3), np.zeros(3)
    for t in range(1, 5):
        grads = random_tensors(rng, [(3, 2), (3,)])
        params = opt.step(params, grads, lr=0.01)
        mu = 0.9 * mu + 0.1 * grads[1]
        nu = 0.999 * nu + 0.001 * grads[1] ** 2
        w = w - 0.01 * (mu / (1 - 0.9**t)) / (np.sqrt(nu / (1 - 0.999**t)) + 1e-6)
    np.testing.assert_allclose(params[1], w, rtol=1e-13)


# --------------------------------------------------------------------------
# LARC: the effective rate never exceeds the global LR
# --------------------------------------------------------------------------
def test_larc_effective_rate_never_exceeds_global_lr():
    rng = np.random.default_rng(RNG_SEED)
    lr, eta = 0.1, 0.05
    above_lr_without_clip = 0
    for w_scale in (1e-4, 1e-2, 1.0, 1e2, 1e4):
        for g_scale in (1e-6, 1e-3, 1.0, 1e3):
            w0, g = rng.standard_normal((5, 3)) * w_scale, rng.standard_normal((5, 3)) * g_scale
            lam = eta * np.linalg.norm(w0) / (np.linalg.norm(g) + 1e-4 * np.linalg.norm(w0))
            d = g + 1e-4 * w0
            rates = {}
            for clip in (True, False):
                cfg = config.optimizer_config("lars", momentum=0.0, weight_decay=1e-4, trust_coefficient=eta, clip=clip)
                (w1,) = reference.ReferenceOptimizer(cfg, [True], [True]).step([w0], [g], lr=lr)
                rates[clip] = np.linalg.norm(w0 - w1) / np.linalg.norm(d)
            assert rates[True] <= lr * (1 + 1e-9)
            assert rates[True] == pytest.approx(min(lr, lam), rel=1e-6)
            assert rates[False] == pytest.approx(lr * lam, rel=1e-6)
            above_lr_without_clip += rates[False] > lr
    assert above_lr_without_clip > 0  # the grid does reach rates LARC must clip


# --------------------------------------------------------------------------
# LAMB: one step on hand-computed numbers
# --------------------------------------------------------------------------
def test_lamb_one_step_hand_computed():
    cfg = config.optimizer_config("lamb", lr=0.01, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.01)
    opt = reference.ReferenceOptimizer(cfg, decay=[True], adapt=[True])
    (w,) = opt.step([np.array([3.0, 4.0])], [np.array([0.5, -2.0])], lr=0.01)
    # t = 1: bias correction makes mh = g, nh = g^2, so mh / sqrt(nh) = sign(g) = [1, -1].
    # u = [1, -1] + 0.01 * [3, 4] = [1.03, -0.96]; ||u||^2 = 1.0609 + 0.9216 = 1.9825; ||w|| = 5.
    r = 5.0 / math.sqrt(1.9825)  # = 3.5511041211...
    np.testing.assert_allclose(w, [3.0 - 0.01 * r * 1.03, 4.0 + 0.01 * r * 0.96], rtol=1e-14)
    assert w == pytest.approx([2.9634236275522356, 4.0340905995629649], rel=1e-14)  # 30-digit decimal arithmetic
    np.testing.assert_allclose(opt.state["mu"][0], [0.05, -0.2], rtol=1e-14)
    np.testing.assert_allclose(opt.state["nu"][0], [0.00025, 0.004], rtol=1e-12)


# --------------------------------------------------------------------------
# Momentum correction rescales the velocity
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "lars"])
@pytest.mark.parametrize("correction", [True, False])
def test_momentum_correction_rescales_velocity(name, correction):
    cfg = config.optimizer_config(name, momentum=0.9, momentum_correction=correction)
    adapt = [False]  # ratio 1 keeps the arithmetic readable; LARS and SGD must then agree
    opt = reference.ReferenceOptimizer(cfg, decay=[True], adapt=adapt)
    w0, g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array([-1.0, 2.0])
    w1 = opt.step([w0], [g1], lr=0.1)
    v1 = 0.1 * g1
    np.testing.assert_allclose(opt.state["velocity"][0], v1, rtol=1e-15)
    (w2,) = opt.step(w1, [g2], lr=0.4)
    factor = schedules.momentum_correction(0.1, 0.4) if correction else 1.0
    v2 = 0.9 * v1 * factor + 0.4 * g2
    np.testing.assert_allclose(opt.state["velocity"][0], v2, rtol=1e-14)
    np.testing.assert_allclose(w2, w0 - v1 - v2, rtol=1e-14)
    assert opt.state["prev_lr"] == 0.4


def test_momentum_correction_skipped_after_zero_lr():
    opt = reference.ReferenceOptimizer(config.optimizer_config("sgd", momentum=0.5), decay=[False], adapt=[False])
    g = np.array([1.0])
    w = opt.step([np.zeros(1)], [g], lr=0.0)  # v = 0, prev_lr = 0
    w = opt.step(w, [g], lr=0.2)  # prev_lr == 0: no rescale (no division by zero)
    np.testing.assert_allclose(opt.state["velocity"][0], [0.2], rtol=1e-15)
    assert np.all(np.isfinite(w[0]))


# --------------------------------------------------------------------------
# Non-finite gradients skip the step and count it
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "lars", "larc", "clars", "lamb"])
def test_nonfinite_gradient_skips_and_counts(name):
    rng = np.random.default_rng(RNG_SEED)
    shapes = [(3, 2), (2,)]
    norms = (lambda: [1.0, 2.0]) if name == "clars" else (lambda: None)
    steps = [random_tensors(rng, shapes) for _ in range(3)]
    bad = [g.copy() for g in steps[1]]
    bad[0][1, 1] = np.nan

    def run(with_bad_step: bool):
        opt = reference.ReferenceOptimizer(config.optimizer_config(name), decay=[True, False], adapt=[True, False])
        params = random_tensors(np.random.default_rng(7), shapes)
        params = opt.step(params, steps[0], lr=0.1, grad_norms=norms())
        if with_bad_step:
            before = {k: [a.copy() for a in v] if isinstance(v, list) else v for k, v in opt.state.items()}
            after = opt.step(params, bad, lr=0.3, grad_norms=norms())
            for a, b in zip(after, params):
                np.testing.assert_array_equal(a, b)
            for key, value in before.items():
                if key != "skipped":
                    if isinstance(value, list):
                        for x, y in zip(value, opt.state[key]):
                            np.testing.assert_array_equal(x, y)
                    else:
                        assert opt.state[key] == value, key
        params = opt.step(params, steps[2], lr=0.2, grad_norms=norms())
        return params, opt.state

    clean, clean_state = run(False)
    skipped, skipped_state = run(True)
    assert (clean_state["skipped"], skipped_state["skipped"]) == (0, 1)
    assert skipped_state["step"] == clean_state["step"] == 2
    for a, b in zip(clean, skipped):
        np.testing.assert_array_equal(a, b)  # the skipped step left no trace


def test_nonfinite_grad_norm_skips_clars_and_raise_policy_raises():
    opt = reference.ReferenceOptimizer(config.optimizer_config("clars"), decay=[True], adapt=[True])
    w = [np.ones(3)]
    assert opt.step(w, [np.ones(3)], lr=0.1, grad_norms=[math.inf])[0].tolist() == [1.0, 1.0, 1.0]
    assert opt.state["skipped"] == 1 and opt.state["step"] == 0
    strict = reference.ReferenceOptimizer(config.optimizer_config("lars", nonfinite="raise"), [True], [True])
    with pytest.raises(FloatingPointError):
        strict.step(w, [np.array([1.0, np.inf, 0.0])], lr=0.1)
    assert strict.state["step"] == 0 and "velocity" not in strict.state


# --------------------------------------------------------------------------
# ALGORITHMS.md equivalence: with a constant LR our LARS equals the form whose
# velocity is ours divided by the LR (timm's Lars(always_adapt=True)).
# --------------------------------------------------------------------------
def velocity_over_lr_lars(params, grad_fn, *, lr, steps, momentum, weight_decay, eta, clip, nesterov):
    """LARS written with buf = v / lr (timm's form): scale the decayed gradient, accumulate, multiply by lr last.

    Returns the parameters and the buffers after ``steps`` steps.
    """
    bufs = [None] * len(params)
    params = [p.copy() for p in params]
    for _ in range(steps):
        grads = grad_fn(params)
        for i, (p, g) in enumerate(zip(params, grads)):
            p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
            ratio = eta * p_norm / (g_norm + weight_decay * p_norm) if p_norm > 0 and g_norm > 0 else 1.0
            if clip:
                ratio = min(ratio / lr, 1.0)
            scaled = (g + weight_decay * p) * ratio
            bufs[i] = scaled.copy() if bufs[i] is None else momentum * bufs[i] + scaled
            direction = scaled + momentum * bufs[i] if nesterov else bufs[i]
            params[i] = p - lr * direction
    return params, bufs


@pytest.mark.parametrize("clip, nesterov", [(False, False), (False, True), (True, False)])
def test_constant_lr_lars_equals_velocity_over_lr_form(clip, nesterov):
    rng = np.random.default_rng(RNG_SEED)
    shapes = [(5, 4), (4,), (3, 5)]
    targets = random_tensors(rng, shapes)
    curvature = [rng.uniform(0.5, 2.0, shape) for shape in shapes]

    def grad_fn(params):  # gradient of a separable quadratic: depends on the trajectory
        return [c * (p - t) for c, p, t in zip(curvature, params, targets)]

    start = random_tensors(rng, shapes)
    start[1] = np.zeros(4)  # a zero tensor exercises the ratio-1 branch in both forms
    lr, kw = 0.7, dict(momentum=0.9, weight_decay=1e-3, eta=0.02)
    cfg = config.optimizer_config(
        "lars", lr=lr, momentum=kw["momentum"], weight_decay=kw["weight_decay"],
        trust_coefficient=kw["eta"], clip=clip, nesterov=nesterov,
    )
    opt = reference.ReferenceOptimizer.for_tensors(cfg, ["a", "b", "c"], shapes, False, False)
    ours = [p.copy() for p in start]
    for _ in range(20):
        ours = opt.step(ours, grad_fn(ours), lr=lr)
    theirs, bufs = velocity_over_lr_lars(start, grad_fn, lr=lr, steps=20, clip=clip, nesterov=nesterov, **kw)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for v, buf in zip(opt.state["velocity"], bufs):  # our velocity is theirs times the LR
        np.testing.assert_allclose(v, lr * buf, rtol=1e-12, atol=1e-15)
    # and the trajectory moved (the comparison is not between two untouched copies)
    assert max(np.abs(a - s).max() for a, s in zip(ours, start)) > 1e-3


# --------------------------------------------------------------------------
# CLARS helper and the exclusion rules
# --------------------------------------------------------------------------
def test_per_example_norm_mean_and_clars_uses_it():
    per_example = np.array([[3.0, 4.0], [0.0, 1.0]])
    assert reference.per_example_norm_mean(per_example) == 3.0
    cfg = config.optimizer_config("clars", momentum=0.0, trust_coefficient=0.1)
    opt = reference.ReferenceOptimizer(cfg, decay=[True], adapt=[True])
    w0 = np.array([6.0, 8.0])  # ||w|| = 10
    (w1,) = opt.step([w0], [per_example.mean(axis=0)], lr=1.0, grad_norms=[3.0])
    np.testing.assert_allclose(w1, w0 - (0.1 * 10 / 3.0) * per_example.mean(axis=0), rtol=1e-15)


@pytest.mark.parametrize(
    "name, shape, excluded",
    [
        ("layer1.0.bn1.weight", (64, 3), True),  # 2-D on purpose: excluded by name alone
        ("dense/bias", (10, 10), True),
        ("subnet.conv.weight", (8, 3, 3, 3), False),  # 'subnet' must not match 'bn'
        ("encoder.layer_norm.weight", (16, 16), True),
        ("model.BatchNorm2d.weight", (4, 4), True),  # case-insensitive
        ("features.0.conv.weight", (8, 3, 3, 3), False),
        ("fc.weight", (10, 5), False),
        ("fc.weight", (10,), True),  # ndim <= 1
        ("temperature", (), True),
    ],
)
def test_default_exclusion_rule(name, shape, excluded):
    for argument in ("exclude_from_weight_decay", "exclude_from_layer_adaptation"):
        assert config.resolve_exclusion(None, argument)(name, shape) is excluded


def test_user_rules_replace_the_default_and_switches_are_independent():
    regex = config.resolve_exclusion([r"^head\."], "exclude_from_weight_decay")
    assert regex("head.weight", (3, 3)) and not regex("layer1.bn1.weight", (3, 3))
    predicate = config.resolve_exclusion(lambda n, s: len(s) == 4, "exclude_from_layer_adaptation")
    assert predicate("conv", (1, 1, 1, 1)) and not predicate("bias", (3,))
    assert not config.resolve_exclusion(False, "exclude_from_weight_decay")("dense/bias", (3,))
    opt = reference.ReferenceOptimizer.for_tensors(
        config.LARSConfig(), ["conv.weight", "conv.bias"], [(2, 2), (2,)],
        exclude_from_weight_decay=False, exclude_from_layer_adaptation=None,
    )
    assert opt.decay == [True, True] and opt.adapt == [True, False]
