"""The package's CPU kernels (``hvd_largebatch.tf.fused_kernels``, ``fused_kernels.cc``) against plain TensorFlow.

The optimizer-level parity of every path with the float64 oracle is in
``test_keras_optimizer_parity.py``; here each op is checked on its own, on
shapes whose sizes are not multiples of the kernels' blocks and lanes, in
float32 and float64, and the kernels' sums are checked to be the same bits
whatever the thread count. The kernels must build on this machine (a
compiler is part of the set-up), so a missing build fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from hvd_largebatch.tf import LARS, fused_kernels

#: Sizes around the kernels' block (8192) and lane (16) boundaries, and a scalar.
SHAPES = [(), (3,), (17,), (5, 7), (8192,), (8193,), (3, 3, 64, 65)]


def tensors(dtype, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(0.0, scale, s).astype(dtype)) for s in SHAPES]


def variables(dtype, seed):
    return [tf.Variable(t) for t in tensors(dtype, seed)]


def test_the_kernels_build_and_load_here():
    assert fused_kernels.native_ops() is not None


def test_they_are_used_only_when_asked_for():
    w = tf.Variable(np.ones((4, 4), np.float32))
    for fused, native in ((True, False), (False, False), ("native", True)):
        optimizer = LARS(learning_rate=0.1, fused=fused)
        optimizer.apply([tf.ones((4, 4))], [w])
        assert optimizer._native_kernels == native, fused


def test_the_fused_argument_is_checked():
    with pytest.raises(ValueError, match="fused must be True, False or 'native', got 'Native'"):
        LARS(learning_rate=0.1, fused="Native")


def test_they_are_not_used_for_mixed_dtypes_nor_inside_xla():
    assert not fused_kernels.native_kernels_usable(
        [tf.Variable(np.zeros(3, np.float32)), tf.Variable(np.zeros(3, np.float64))]
    )
    variable = tf.Variable(np.zeros(3, np.float32))
    seen = []

    @tf.function(jit_compile=True)
    def traced():
        seen.append(fused_kernels.native_kernels_usable([variable]))
        return tf.constant(0.0)

    traced()
    assert seen == [False]
    assert fused_kernels.native_kernels_usable([variable])


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-13)])
def test_tensor_stats(dtype, rtol):
    grads, weights = tensors(dtype, 1), variables(dtype, 2)
    stats = fused_kernels.tensor_stats(grads, weights).numpy()
    expected = [[np.sum(g.numpy(), dtype=np.float64), np.sum(g.numpy().astype(np.float64) ** 2),
                 np.sum(w.numpy().astype(np.float64) ** 2)] for g, w in zip(grads, weights)]
    np.testing.assert_allclose(stats, expected, rtol=rtol, atol=rtol * 1e-3)
    without = fused_kernels.tensor_stats(grads).numpy()
    np.testing.assert_array_equal(without[:, :2], stats[:, :2])
    np.testing.assert_array_equal(without[:, 2], 0)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_momentum_all_is_the_rule_in_place(dtype, nesterov):
    grads, weights, slots = tensors(dtype, 1), variables(dtype, 2), variables(dtype, 3)
    rates = np.linspace(0.1, 0.7, len(SHAPES)).astype(dtype)
    decays = np.where(np.arange(len(SHAPES)) % 2 == 0, 0.05, 0.0).astype(dtype)
    scale, momentum = dtype(0.8), dtype(0.9)
    expected_w, expected_m = [], []
    for g, w, m, r, beta in zip(grads, weights, slots, rates, decays):
        d = g.numpy() + beta * w.numpy() if beta else g.numpy()
        new_m = scale * m.numpy() - r * d
        expected_m.append(new_m)
        expected_w.append(w.numpy() + (momentum * new_m - r * d if nesterov else new_m))
    fused_kernels.apply_momentum_all(weights, slots, grads, tf.constant(rates), tf.constant(decays),
                                     tf.constant(scale), tf.constant(momentum), nesterov=nesterov)
    for w, m, ew, em in zip(weights, slots, expected_w, expected_m):
        np.testing.assert_array_equal(m.numpy(), em)
        np.testing.assert_allclose(w.numpy(), ew, rtol=1e-6 if dtype == np.float32 else 1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lamb_stats_then_apply(dtype):
    grads, weights = tensors(dtype, 1), variables(dtype, 2)
    first = variables(dtype, 3)
    second = [tf.Variable(tf.abs(t)) for t in tensors(dtype, 4)]
    b1, b2, eps = dtype(0.9), dtype(0.999), dtype(1e-3)
    decays = np.where(np.arange(len(SHAPES)) % 2 == 0, 0.01, 0.0).astype(dtype)
    steps = np.linspace(1e-3, 1e-2, len(SHAPES)).astype(dtype)
    moments, directions = [], []
    for g, w, mu, nu, dec in zip(grads, weights, first, second, decays):
        new_mu = b1 * mu.numpy() + (dtype(1) - b1) * g.numpy()
        new_nu = b2 * nu.numpy() + (dtype(1) - b2) * (g.numpy() * g.numpy())
        q = new_mu / (np.sqrt(new_nu) + eps)
        moments.append((new_mu, new_nu))
        directions.append(q + dec * w.numpy() if dec else q)
    before = [v.numpy().copy() for v in first + second]
    args = (tf.constant(b1), tf.constant(b2), tf.constant(eps), tf.constant(decays))
    stats = fused_kernels.lamb_stats(grads, first, second, weights, *args).numpy()
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, first + second)), "lamb_stats wrote a slot"
    rtol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(stats[:, 1], [np.sum(w.numpy().astype(np.float64) ** 2) for w in weights], rtol=rtol)
    np.testing.assert_allclose(stats[:, 2], [np.sum(q.astype(np.float64) ** 2) for q in directions], rtol=rtol)
    old_w = [w.numpy().copy() for w in weights]
    fused_kernels.lamb_apply(weights, first, second, grads, *args, tf.constant(steps))
    for w, mu, nu, (emu, enu), q, a, w0 in zip(weights, first, second, moments, directions, steps, old_w):
        np.testing.assert_array_equal(mu.numpy(), emu)
        np.testing.assert_array_equal(nu.numpy(), enu)
        np.testing.assert_array_equal(w.numpy(), w0 - a * q)


def test_sums_do_not_depend_on_the_thread_count():
    """The kernels sum in fixed blocks: one thread and the default pool give the same bits."""
    big = [tf.constant(np.random.default_rng(7).normal(size=(300_001,)).astype(np.float32))]
    weight = [tf.Variable(np.random.default_rng(8).normal(size=(300_001,)).astype(np.float32))]
    pool = fused_kernels.tensor_stats(big, weight).numpy()

    @tf.function
    def inline():
        return fused_kernels.tensor_stats(big, weight)

    options = tf.data.Options()  # a single-threaded run of the same op through tf.data's private pool
    options.threading.private_threadpool_size = 1
    single = tf.data.Dataset.from_tensors(0).map(lambda _: fused_kernels.tensor_stats(big, weight)).with_options(options)
    np.testing.assert_array_equal(pool, next(iter(single)).numpy())
    np.testing.assert_array_equal(pool, inline().numpy())


@pytest.mark.parametrize("with_weights", [True, False], ids=["g_and_w", "g_only"])
@pytest.mark.parametrize("size", [4 * 8192, 5 * 8192 + 100])
def test_a_tensors_sums_are_its_blocks_sums_in_block_order(size, with_weights):
    """The stats op reads two blocks at a time where it can: each block still sums exactly as on its own.

    float64, so the op's result is its per-block sums added in block order
    with no rounding to the tensor's dtype: the same bits as the op run on
    each block as a tensor of its own, added here in the same order.
    """
    rng = np.random.default_rng(11)
    # Magnitudes over 12 decades: any change in the order of additions changes the bits.
    g, w = (rng.normal(size=size) * 10.0 ** rng.uniform(-6, 6, size) for _ in range(2))
    whole = fused_kernels.tensor_stats([tf.constant(g)], [tf.Variable(w)] if with_weights else None).numpy()[0]
    starts = range(0, size, 8192)
    blocks = fused_kernels.tensor_stats(
        [tf.constant(g[b:b + 8192]) for b in starts],
        [tf.Variable(w[b:b + 8192]) for b in starts] if with_weights else None,
    ).numpy()
    expected = [0.0, 0.0, 0.0]
    for row in blocks:
        expected = [total + value for total, value in zip(expected, row)]
    np.testing.assert_array_equal(whole, expected)


def test_lars_takes_the_native_path_on_cpu():
    w = tf.Variable(np.ones((4, 4), np.float32))
    optimizer = LARS(learning_rate=0.1, fused="native")
    optimizer.apply([tf.ones((4, 4))], [w])
    assert optimizer._native_kernels
