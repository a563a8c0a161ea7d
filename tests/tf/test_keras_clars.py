"""CLARS's per-example gradient norms in Keras: the estimators against loops, and CLARSModel under fit.

* ``exact`` (chunked ``tf.vectorized_map``) equals a Python loop over the
  examples, for every chunk size;
* ``microbatch:k`` equals a loop over ``numpy.array_split`` parts, and with
  ``k`` = batch size equals ``exact``;
* one ``fit`` step of :class:`CLARSModel` on a model with BatchNorm: the norms
  it hands the optimizer are the per-example norms of the inference-mode
  network with this batch's statistics, the BN moving averages are those of
  a plain Keras step, and the weights are the oracle's CLARS step.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from hvd_largebatch import config, reference
from hvd_largebatch.tf import CLARS, LARS, CLARSModel, DistributedOptimizer, per_example_grad_norm_sums



def LOSS(y_true, y_pred):
    """Cross-entropy on logits, in the dtype of the logits (a Loss object would fix its dtype at creation)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=y_pred.dtype)(y_true, y_pred)


def plain_model(seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(6, activation="tanh", name="dense")(inputs)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def bn_model(seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(6, name="dense")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.8, name="batch_normalization")(x)
    x = keras.layers.Activation("tanh")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def batch(n=10, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)), rng.integers(0, 3, size=n)


def inference_loss(model):
    return lambda x, y: LOSS(y, model(x, training=False))


def gradient_norms(model, x, y):
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=False))
    return np.array([np.linalg.norm(g.numpy()) for g in tape.gradient(loss, model.trainable_variables)])


def looped_mean(model, parts):
    return np.mean([gradient_norms(model, xp, yp) for xp, yp in parts], axis=0)


@pytest.mark.parametrize(
    "chunk_size, graph",
    [(1, True), (3, True), (4, True), (10, True), (64, True), (3, False)],
    ids=["1-graph", "3-graph", "4-graph", "10-graph", "64-graph", "3-eager"],
)
def test_exact_norms_equal_a_loop_over_examples(float64, chunk_size, graph):
    """10 examples: chunks of 3 leave one example, which pfor handles differently in a graph."""
    model = plain_model()
    x, y = batch()

    def norm_sums(x, y):
        return per_example_grad_norm_sums(
            inference_loss(model), model.trainable_variables, x, y, estimator="exact", chunk_size=chunk_size
        )

    sums, count = (tf.function(norm_sums) if graph else norm_sums)(tf.constant(x), tf.constant(y))
    expected = looped_mean(model, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))])
    assert float(count) == len(x)
    np.testing.assert_allclose(sums.numpy() / float(count), expected, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 4, 10, 25])
def test_microbatch_norms_equal_a_loop_over_array_split_parts(float64, k):
    model = plain_model()
    x, y = batch()
    norm_sums = tf.function(
        lambda x, y: per_example_grad_norm_sums(
            inference_loss(model), model.trainable_variables, x, y, estimator=f"microbatch:{k}"
        )
    )
    sums, count = norm_sums(tf.constant(x), tf.constant(y))
    parts = list(zip(np.array_split(x, min(k, len(x))), np.array_split(y, min(k, len(x)))))
    assert float(count) == len(parts)
    np.testing.assert_allclose(sums.numpy() / float(count), looped_mean(model, parts), rtol=1e-12)


def test_microbatch_with_k_equal_to_the_batch_size_is_exact(float64):
    model = plain_model()
    x, y = batch(n=12)
    loss, variables = inference_loss(model), model.trainable_variables

    @tf.function
    def both(x, y):
        return (
            per_example_grad_norm_sums(loss, variables, x, y, estimator="microbatch:12"),
            per_example_grad_norm_sums(loss, variables, x, y, estimator="exact", chunk_size=5),
        )

    (micro, n_micro), (exact, n_exact) = both(tf.constant(x), tf.constant(y))
    np.testing.assert_allclose(micro.numpy() / float(n_micro), exact.numpy() / float(n_exact), rtol=1e-12)


def batch_statistics(model, x):
    """The mean and biased variance of the BatchNorm layer's input over the batch."""
    bn = model.get_layer("batch_normalization")
    features = keras.Model(model.inputs, bn.input)(x, training=True).numpy()
    return features.mean(axis=0), features.var(axis=0)


@pytest.mark.parametrize("estimator", ["exact", "microbatch:3"])
def test_one_clars_model_step_with_batchnorm(float64, estimator):
    x, y = batch(n=9)
    model = CLARSModel(bn_model())
    optimizer = CLARS(learning_rate=0.5, weight_decay=1e-3, trust_coefficient=0.02, estimator=estimator, chunk_size=4)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    start = bn_model()  # the same initial weights
    variables = start.trainable_variables
    paths, shapes = [v.path for v in variables], [tuple(v.shape) for v in variables]
    params = [v.numpy().copy() for v in variables]

    # What the step must compute, by hand.
    with tf.GradientTape() as tape:
        train_loss = LOSS(y, start(x, training=True))
    grads = [g.numpy() for g in tape.gradient(train_loss, variables)]
    frozen = bn_model()
    mean, var = batch_statistics(frozen, x)
    bn = frozen.get_layer("batch_normalization")
    old_mean, old_var = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    bn.moving_mean.assign(mean)
    bn.moving_variance.assign(var)
    if estimator == "exact":
        parts = [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
    else:
        parts = list(zip(np.array_split(x, 3), np.array_split(y, 3)))
    norms = looped_mean(frozen, parts)

    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)

    np.testing.assert_allclose(optimizer.grad_norm_means.numpy(), norms, rtol=1e-10)
    bn_after = model.inner_model.get_layer("batch_normalization")
    np.testing.assert_allclose(bn_after.moving_mean.numpy(), 0.8 * old_mean + 0.2 * mean, rtol=1e-12)
    np.testing.assert_allclose(bn_after.moving_variance.numpy(), 0.8 * old_var + 0.2 * var, rtol=1e-12)
    oracle = reference.ReferenceOptimizer.for_tensors(
        config.optimizer_config("clars", lr=0.5, weight_decay=1e-3, trust_coefficient=0.02), paths, shapes
    )
    expected = oracle.step(params, grads, 0.5, grad_norms=list(norms))
    for v, e in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-10, atol=1e-14, err_msg=v.path)


def test_clars_model_moving_averages_match_plain_keras_training(float64):
    """Three fit steps: the wrapper's BN moving averages equal those of an ordinary fit."""
    x, y = batch(n=24)
    wrapped = CLARSModel(bn_model())
    wrapped.compile(optimizer=CLARS(learning_rate=0.0), loss=LOSS)
    plain = bn_model()
    plain.compile(optimizer=LARS(learning_rate=0.0), loss=LOSS)
    for model in (wrapped, plain):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(wrapped.inner_model.non_trainable_variables, plain.non_trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, err_msg=a.path)


@pytest.mark.parametrize(
    "optimizer, loss, message",
    [
        (LARS(), LOSS, "needs a CLARS optimizer"),
        (keras.optimizers.SGD(), LOSS, "needs a CLARS optimizer"),
        (DistributedOptimizer(CLARS(), backward_passes_per_step=2), LOSS, "backward_passes_per_step=1"),
        (CLARS(), [LOSS], "one loss for one output"),
    ],
    ids=["lars", "keras-sgd", "backward-passes", "loss-list"],
)
def test_clars_model_refusals(optimizer, loss, message):
    model = CLARSModel(plain_model())
    model.compile(optimizer=optimizer, loss=loss)
    x, y = batch()
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, batch_size=5, verbose=0)


def test_clars_without_fresh_norms_raises_instead_of_using_stale_ones(float64):
    w = keras.Variable(np.ones((2, 2)), name="kernel")
    optimizer = CLARS()
    optimizer.build([w])
    optimizer.set_grad_norms({"kernel": 1.0})
    optimizer.apply([np.ones((2, 2))], [w])
    with pytest.raises(ValueError, match="set_grad_norms"):
        optimizer.apply([np.ones((2, 2))], [w])
    step = tf.function(lambda g: optimizer.apply(g, [w]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="set_grad_norms"):
        step([tf.ones((2, 2), dtype=tf.float64)])
