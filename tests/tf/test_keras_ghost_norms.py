"""Keras ghost-norm per-example gradient norms equal the vectorized_map reference in float64."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from hvd_largebatch.tf import CLARS, CLARSModel
from hvd_largebatch.tf import ghost_norms
from hvd_largebatch.tf.ghost_norms import (
    GhostRecorder, conv_norm_form, only_batch_norm_depends_on_training, transposes_by_forward_convolution,
    uses_filter_gradient,
)
from hvd_largebatch.tf.per_example_norms import exact_norm_sums, exact_norm_sums_by_rules

L = keras.layers


def LOSS(y_true, y_pred):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=y_pred.dtype)(y_true, y_pred)


def _bn(name):
    return L.BatchNormalization(momentum=0.5, name=name)


# (id, example shape, layers between the input and the 3-way Dense head)
MODELS = [
    ("dense-bias-bn", (5,), lambda: [L.Dense(7), _bn("bn1"), L.Activation("relu")]),
    ("dense-nobias", (5,), lambda: [L.Dense(7, use_bias=False, activation="tanh")]),
    ("dense-seq-gram", (2, 8), lambda: [L.Dense(8, activation="tanh"), L.Flatten()]),
    ("dense-seq-product", (3, 4), lambda: [L.Dense(6, activation="tanh"), L.Flatten()]),
    ("conv1d-bn", (16, 2), lambda: [
        L.Conv1D(4, 3, strides=2, padding="same"), _bn("bn1"), L.Activation("relu"),
        L.Conv1D(6, 3, dilation_rate=2, use_bias=False), _bn("bn2"), L.Activation("relu"),
        L.Conv1D(4, 3, padding="causal", activation="tanh"), L.Flatten()]),
    ("conv1d-nobias-gram", (4, 8), lambda: [L.Conv1D(8, 2, strides=2, use_bias=False, activation="relu"), L.Flatten()]),
    ("conv2d-bn", (8, 9, 2), lambda: [
        L.Conv2D(4, 3, padding="same"), _bn("bn1"), L.Activation("relu"),
        L.Conv2D(4, (3, 2), strides=2, use_bias=False), _bn("bn2"), L.Activation("relu"),
        L.Conv2D(6, 3, padding="same", dilation_rate=(1, 2)), L.Flatten()]),
    # the 2-D Gram form (4 output positions, 54 patch rows), then a single position
    ("conv2d-gram-bn", (4, 4, 6), lambda: [
        L.Conv2D(8, 3, strides=2, padding="same"), _bn("bn1"), L.Activation("relu"), L.Conv2D(12, 2), L.Flatten()]),
    # 2-D products both ways: a strided 3x3 with uneven "same" padding by per-example weight-gradient
    # convolutions, a strided 1x1 by the product on its patches
    ("conv2d-strided-same-and-1x1", (7, 7, 3), lambda: [
        L.Conv2D(5, 3, strides=2, padding="same"), _bn("bn1"), L.Activation("relu"),
        L.Conv2D(6, 1, strides=2, activation="tanh"), L.Flatten()]),
    # stride-1 Conv2D layers above measured ones: the per-example backward transposes them by forward
    # convolutions (odd "same", even "same" with its uneven padding, 1x1 "valid")
    ("conv2d-stride-1-transposed", (6, 6, 3), lambda: [
        L.Conv2D(4, 3, padding="same"), _bn("bn1"), L.Activation("relu"),
        L.Conv2D(5, 3, padding="same", use_bias=False), _bn("bn2"), L.Activation("relu"),
        L.Conv2D(4, 2, padding="same", activation="tanh"), L.Conv2D(3, 1, activation="tanh"), L.Flatten()]),
    # one BatchNorm layer called twice (its variables fall back; CLARSModel measures all in a separate pass)
    ("bn-called-twice", (5,), lambda: (lambda bn: [
        L.Dense(7), bn, L.Activation("relu"), L.Dense(7), bn, L.Activation("relu")])(_bn("bn1"))),
    # BatchNorm and a layer without a rule; and a Dropout, which makes CLARSModel use a separate pass
    ("bn-and-layernorm", (5,), lambda: [L.Dense(7), _bn("bn1"), L.Activation("relu"), L.Dense(6), L.LayerNormalization()]),
    ("bn-and-dropout", (5,), lambda: [L.Dense(7), _bn("bn1"), L.Activation("relu"), L.Dropout(0.0)]),
    # TensorFlow's vectorized_map cannot differentiate grouped convolutions: these compare with a loop only
    ("conv-groups", (6, 5, 4), lambda: [
        L.Conv2D(6, 3, groups=2, activation="relu"), L.Reshape((12, 6)), L.Conv1D(4, 3, groups=2, use_bias=False),
        L.Flatten()]),
    ("layernorm-falls-back", (5,), lambda: [L.Dense(7), L.LayerNormalization(), L.Activation("relu")]),
]


def _model_and_batch(shape, layers, n=9):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    x = inputs
    for layer in layers():
        x = layer(x)
    model = keras.Model(inputs, L.Dense(3, name="head")(x))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, *shape))
    # BatchNorm at this batch's statistics, as CLARSModel leaves it for the per-example pass
    model(x, training=True)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.momentum = 0.0
    model(x, training=True)
    return model, tf.constant(x), tf.constant(rng.integers(0, 3, size=n))


def _reference(model, x, y):
    return exact_norm_sums(lambda xb, yb: LOSS(yb, model(xb, training=False)), model.trainable_variables, x, y, 4)


def _looped(model, x, y):
    """Sum over examples of each variable's gradient norm, one tape per example."""
    total = 0.0
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[i : i + 1], model(x[i : i + 1], training=False))
        total = total + np.array([np.linalg.norm(g.numpy()) for g in tape.gradient(loss, model.trainable_variables)])
    return total


CASES = [(*m, True) for m in MODELS] + [(*m, False) for m in MODELS if m[0] == "conv2d-bn"]


@pytest.mark.parametrize("name,shape,layers,graph", CASES, ids=[f"{c[0]}-{'graph' if c[3] else 'eager'}" for c in CASES])
def test_ghost_norms_equal_the_vectorized_map_reference(float64, name, shape, layers, graph):
    model, x, y = _model_and_batch(shape, layers)
    variables = model.trainable_variables
    ghost_fn = lambda x, y: exact_norm_sums_by_rules(model, LOSS, variables, x, y, 4)  # noqa: E731
    ghost, count = (tf.function(ghost_fn) if graph else ghost_fn)(x, y)
    assert float(count) == len(x)
    np.testing.assert_allclose(ghost.numpy(), _looped(model, x, y), rtol=1e-10, atol=1e-12)
    if name != "conv-groups":
        reference, _ = (tf.function(_reference) if graph else _reference)(model, x, y)
        np.testing.assert_allclose(ghost.numpy(), reference.numpy(), rtol=1e-10, atol=1e-12)
    for layer in model.layers:  # the recorder leaves no wrapper behind
        assert not {"call", "convolution_op", "_moments", "_hvd_largebatch_activation"} & set(layer.__dict__)


def test_the_model_rows_cover_every_2d_convolution_form():
    """The rows above compare each way of measuring a Conv2D kernel with the reference."""
    forms = {}
    for name, shape, layers in MODELS:
        model, _, _ = _model_and_batch(shape, layers, n=2)
        for layer in model.layers:
            if isinstance(layer, L.Conv2D):
                positions = int(np.prod(layer.output.shape[1:-1]))
                form = (conv_norm_form(layer, positions), uses_filter_gradient(layer, positions))
                forms.setdefault(form, []).append(f"{name}/{layer.name}")
    assert {("gram", False), ("product", True), ("product", False)} <= set(forms), forms


def test_the_model_rows_transpose_every_kind_of_stride_1_convolution():
    """Rows with a Conv2D that the per-example backward transposes by a forward convolution, for each padding."""
    kinds = set()
    for name, shape, layers in MODELS:
        model, _, _ = _model_and_batch(shape, layers, n=2)
        for layer in model.layers:
            if transposes_by_forward_convolution(layer) and layer.input is not model.inputs[0]:
                kinds.add((layer.padding, "odd" if layer.kernel_size[0] % 2 else "even"))
    assert {("same", "odd"), ("same", "even"), ("valid", "odd"), ("valid", "even")} <= kinds, kinds


@pytest.mark.parametrize("length,size,stride,rate,padding", [
    (40, 5, 1, 1, "SAME"), (40, 3, 2, 1, "SAME"), (19, 3, 2, 1, "SAME"), (17, 4, 3, 1, "SAME"), (16, 3, 1, 2, "VALID"),
    (17, 4, 3, 2, "VALID"), (9, 1, 2, 1, "VALID"), (9, 2, 2, 1, "VALID"), (10, 3, 1, 3, "SAME"),
])
def test_1d_patches_are_tensorflows_patches(length, size, stride, rate, padding):
    x = tf.constant(np.random.default_rng(0).normal(size=(3, length, 2)))
    expected = tf.image.extract_patches(
        x[:, None], sizes=[1, 1, size, 1], strides=[1, 1, stride, 1], rates=[1, 1, rate, 1], padding=padding
    )[:, 0]
    got = ghost_norms._patches_1d(x, size, stride, rate, padding == "SAME", expected.shape[1])
    np.testing.assert_array_equal(got.numpy(), expected.numpy())


def test_per_example_filter_gradients_are_the_same_unrolled_and_in_a_loop(float64):
    """A static batch takes one call per example without a loop, a dynamic one a map_fn over padded steps."""
    layer = L.Conv2D(3, 3, strides=2, padding="same")
    layer.build((None, 5, 5, 2))
    rng = np.random.default_rng(0)
    x, g = tf.constant(rng.normal(size=(11, 5, 5, 2))), tf.constant(rng.normal(size=(11, 3, 3, 3)))
    expected = []
    for i in range(11):
        kernel = tf.convert_to_tensor(layer.kernel)
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            inner = tf.reduce_sum(layer.convolution_op(x[i : i + 1], kernel) * g[i : i + 1])
        expected.append(float(tf.reduce_sum(tf.square(tape.gradient(inner, kernel)))))
    unrolled = ghost_norms._filter_gradient_squared_norms(layer, x, g)
    spec = [tf.TensorSpec((None, *t.shape[1:]), tf.float64) for t in (x, g)]
    looped = tf.function(lambda x, g: ghost_norms._filter_gradient_squared_norms(layer, x, g), input_signature=spec)(x, g)
    np.testing.assert_allclose(unrolled.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(looped.numpy(), expected, rtol=1e-12)


def test_the_recorder_measures_rule_layers_and_names_the_rest(float64):
    model, x, _ = _model_and_batch(*MODELS[-1][1:])  # Dense, LayerNormalization, Dense
    recorder = GhostRecorder(model, model.trainable_variables)
    with recorder:
        model(x, training=False)
    norm = model.layers[2]
    assert isinstance(norm, L.LayerNormalization)
    assert [v.path for v in recorder.unsupported()] == [v.path for v in norm.trainable_variables]


def test_clars_model_fit_steps_are_the_same_with_ghost_rules_and_the_reference(float64):
    shape, layers = MODELS[0][1:]  # Dense with BatchNorm
    _, x, y = _model_and_batch(shape, layers, n=12)
    runs = {}
    for method in ("auto", "vmap"):
        inner, _, _ = _model_and_batch(shape, layers, n=12)
        model = CLARSModel(inner, method=method)
        optimizer = CLARS(learning_rate=0.5, weight_decay=1e-3, chunk_size=5)
        model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
        model.fit(x, y, batch_size=6, epochs=2, shuffle=False, verbose=0)
        runs[method] = ([v.numpy() for v in model.variables], optimizer.grad_norm_means.numpy())
    for got, expected in zip(runs["auto"][0], runs["vmap"][0]):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(runs["auto"][1], runs["vmap"][1], rtol=1e-10)
    assert CLARSModel.from_config(CLARSModel(_model_and_batch(shape, layers)[0], method="vmap").get_config()).method == "vmap"
    with pytest.raises(ValueError, match="method must be one of 'auto', 'vmap'; got 'ghost'"):
        CLARSModel(_model_and_batch(shape, layers)[0], method="ghost")


FIT_CASES = [m for m in MODELS if m[0] != "conv-groups"]


@pytest.mark.parametrize("name,shape,layers", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_clars_model_steps_with_ghost_rules_equal_the_reference_for_every_model(float64, name, shape, layers):
    """CLARSModel's ghost-rule step (reusing the training forward where only BatchNorm depends on training) equals vmap."""
    _, x, y = _model_and_batch(shape, layers, n=8)
    runs = {}
    for method in ("auto", "vmap"):
        inner, _, _ = _model_and_batch(shape, layers, n=8)
        for layer in inner.layers:
            if isinstance(layer, L.BatchNormalization):
                layer.momentum = 0.7  # the moving averages must come out as Keras's own update leaves them
        assert only_batch_norm_depends_on_training(inner) == (name != "bn-and-dropout")
        model = CLARSModel(inner, method=method)
        optimizer = CLARS(learning_rate=0.5, weight_decay=1e-3, chunk_size=3)
        model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        # a BatchNorm layer called twice: the reference step updates its moving averages once, with the
        # last call's statistics; the fused step trains it as Keras does (two updates), so compare the rest
        compared = model.trainable_variables if name == "bn-called-twice" else model.variables
        runs[method] = ([(v.path, v.numpy()) for v in compared], optimizer.grad_norm_means.numpy())
    for (path, got), (_, expected) in zip(runs["auto"][0], runs["vmap"][0]):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12, err_msg=path)
    np.testing.assert_allclose(runs["auto"][1], runs["vmap"][1], rtol=1e-10)
