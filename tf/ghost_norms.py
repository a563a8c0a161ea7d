"""Per-example gradient norms from activations and output gradients ("ghost norms"), in TensorFlow/Keras.

The same identities as the PyTorch module of this name (ALGORITHMS.md,
"CLARS"): for a layer whose pre-activation output ``z = a W (+ b)`` is linear
in its parameters, example ``i``'s kernel gradient is ``a_i^T g_i`` with
``g_i = d f_i / d z_i``, so

* ``Dense`` (``a_i``: ``(T, d_in)``, ``g_i``: ``(T, d_out)``, ``T = 1`` for a
  plain batch): ``||a_i^T g_i||^2 = sum_{t,s} (a_i a_i^T)_{ts} (g_i g_i^T)_{ts}``
  (``||a_i||^2 ||g_i||^2`` when ``T = 1``); bias gradient ``sum_t g_i[t]``;
* ``Conv1D``/``Conv2D``: the same on the input patches of every output
  position (slices of the input for ``Conv1D``, ``tf.image.extract_patches``
  for ``Conv2D``), per group; bias: ``g_i`` summed
  over positions. A ``Conv2D`` whose per-example kernel gradients are the
  cheaper form (:func:`conv_norm_form`) with a kernel larger than 1x1, one
  group and no dilation forms them with TensorFlow's own weight-gradient
  convolution, one example at a time (:func:`uses_filter_gradient`): on
  CPUs that is two to three times faster than the patches, whose
  extraction alone costs more than the convolution;
* ``BatchNormalization``: ``gamma`` gradient ``sum_positions g_i * xhat_i``
  and ``beta`` gradient ``sum_positions g_i`` per channel, ``xhat``
  normalised by the statistics the layer used: the moving ones in inference
  mode, the batch's in training mode.

BatchNorm in training mode couples the examples through the batch
statistics; the per-example gradient holds them constant (see
:mod:`hvd_largebatch.tf.clars_model`). Inside the recorder, each such
layer's batch mean and variance pass through an identity whose gradient is
switched: the ordinary one for the training gradient, none at all for
:meth:`GhostRecorder.output_gradients` (so that backward skips the
statistics' ops). So one training forward serves both the training
gradient and the per-example norms. That second backward needs no kernel
gradients, and takes the input gradient of a stride-1 ``Conv2D`` from a
forward convolution with the flipped kernel
(:func:`transposes_by_forward_convolution`), cheaper on CPUs than
TensorFlow's ``Conv2DBackpropInput``; the training gradient keeps
TensorFlow's ops.

Each layer uses the cheaper exact form (the Gram form, ``~T^2 (d_in + d_out)``
per example, or the per-example product for that one layer,
``~T d_in d_out``), chosen per layer from its static shapes. :class:`GhostRecorder` wraps, for the duration of one
forward pass, each measured layer's ``call`` (to see its input) and its
``activation`` (to see the pre-activation output ``z``), then one
``tape.gradient`` gives every ``g``. Layers of other kinds, subclasses that
override ``call``, LoRA or quantised layers, layers called more than once and
variables shared between layers are reported by :meth:`GhostRecorder.unsupported`
and measured by the ``vectorized_map`` reference path instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import inspect
import math

import keras
import tensorflow as tf
from keras.src.models.functional import Functional  # Keras 3 has no public name for this class

__all__ = [
    "GhostRecorder", "conv_norm_form", "only_batch_norm_depends_on_training", "transposes_by_forward_convolution",
    "uses_filter_gradient",
]

_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D)


def _rule_roles(layer: Any) -> dict[str, Any]:
    """``{role: variable}`` for a layer with a rule, else ``{}``."""
    kind = type(layer)
    if kind.call is keras.layers.Dense.call and isinstance(layer, keras.layers.Dense):
        plain = not getattr(layer, "lora_enabled", False) and not getattr(layer, "quantization_mode", None)
        if plain and layer.activation is not None:
            return {"kernel": layer.kernel, "bias": layer.bias}
    for conv in _CONVS:
        if isinstance(layer, conv) and kind.call is conv.call and kind.convolution_op is conv.convolution_op:
            plain = not getattr(layer, "lora_enabled", False)
            padding_ok = layer.padding in ("valid", "same", "causal")
            if plain and padding_ok and layer.activation is not None:
                return {"kernel": layer.kernel, "bias": layer.bias}
    if isinstance(layer, keras.layers.BatchNormalization) and kind.call is keras.layers.BatchNormalization.call:
        if not layer.renorm:
            return {"gamma": layer.gamma if layer.scale else None, "beta": layer.beta if layer.center else None}
    return {}


def _all_layers(model: Any) -> list[Any]:
    found, stack, seen = [], [model], set()
    while stack:
        layer = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
    return found


def only_batch_norm_depends_on_training(model: Any) -> bool:
    """Whether ``model(x, training=True)`` differs from inference only in its plain BatchNorm layers.

    True when every layer (nested models included) either takes no
    ``training`` argument, is a ``Functional`` or ``Sequential`` container,
    is a plain ``Dense``/``Conv1D``/``Conv2D`` (which ignore it) or a plain
    BatchNormalization without renorm; a ``Dropout``, a noise layer or a
    subclassed model's own ``call`` make it False.
    """
    for layer in _all_layers(model):
        if isinstance(layer, (Functional, keras.Sequential)) and type(layer).call in (Functional.call, keras.Sequential.call):
            continue
        if "training" not in inspect.signature(layer.call).parameters:
            continue
        if _rule_roles(layer) and not isinstance(layer, keras.layers.BatchNormalization):
            continue
        if isinstance(layer, keras.layers.BatchNormalization) and type(layer).call is keras.layers.BatchNormalization.call:
            if not layer.renorm:
                continue
        return False
    return True


class _Switch:
    """Whether the gradient through BatchNorm's batch statistics flows (training gradient) or not (per-example)."""

    def __init__(self) -> None:
        self.coupled = True


def _switched_identity(switch: _Switch, value: tf.Tensor) -> tf.Tensor:
    """``value``, whose gradient is the upstream one when coupled and none at all otherwise.

    None rather than zeros: the per-example backward then skips the batch
    statistics' backward ops instead of running them on zeros.
    """

    @tf.custom_gradient
    def identity(v):
        def grad(upstream):
            return upstream if switch.coupled else None

        return tf.identity(v), grad

    return identity(value)


def transposes_by_forward_convolution(layer: Any) -> bool:
    """Whether the per-example backward takes this layer's input gradient from a forward convolution.

    A channels-last ``Conv2D`` with strides 1, dilation 1 and one group: its
    input gradient is the convolution of the output gradient with the
    kernel flipped in space and transposed in channels (padded so that the
    output has the input's size). TensorFlow's CPU ``Conv2DBackpropInput``
    is slower than its forward ``Conv2D`` (1.6x for 16 channels at 16x16,
    measured), so the backward that only needs output gradients uses the
    forward kernel; the training gradient keeps TensorFlow's own ops.
    """
    return (
        isinstance(layer, keras.layers.Conv2D)
        and type(layer).convolution_op is keras.layers.Conv2D.convolution_op
        and layer.data_format == "channels_last"
        and layer.groups == 1
        and all(stride == 1 for stride in layer.strides)
        and all(rate == 1 for rate in layer.dilation_rate)
        and layer.padding in ("same", "valid")
    )


def _switched_convolution(switch: _Switch, layer: Any):
    """``layer.convolution_op`` whose gradient is TensorFlow's when coupled, input-only by a forward convolution otherwise.

    For :func:`transposes_by_forward_convolution` layers. The coupled
    gradient is the one TensorFlow registers for ``Conv2D``
    (``Conv2DBackpropInput`` and ``Conv2DBackpropFilter`` with the op's
    strides and padding), so the training gradient is unchanged.
    """
    original = layer.convolution_op
    sizes = [int(size) for size in layer.kernel_size]
    # forward padding (before, after) per spatial axis: "same" puts the larger half after
    forward = [((size - 1) // 2, size - 1 - (size - 1) // 2) if layer.padding == "same" else (0, 0) for size in sizes]
    # the transposed convolution pads the output gradient by what the forward one did not
    pads = [[0, 0]] + [[size - 1 - before, size - 1 - after] for size, (before, after) in zip(sizes, forward)] + [[0, 0]]
    symmetric = all(low == high for low, high in pads[1:3]) and layer.padding == "same"
    unit = [1, 1, 1, 1]

    def convolution_op(inputs, kernel):
        @tf.custom_gradient
        def convolution(x, k):
            def grad(upstream):
                if switch.coupled:
                    padding = "SAME" if layer.padding == "same" else "VALID"
                    shapes = tf.shape_n([x, k])
                    return (
                        tf.raw_ops.Conv2DBackpropInput(
                            input_sizes=shapes[0], filter=k, out_backprop=upstream, strides=unit, padding=padding
                        ),
                        tf.raw_ops.Conv2DBackpropFilter(
                            input=x, filter_sizes=shapes[1], out_backprop=upstream, strides=unit, padding=padding
                        ),
                    )
                flipped = tf.transpose(tf.reverse(k, [0, 1]), [0, 1, 3, 2])
                if symmetric:
                    return tf.nn.conv2d(upstream, flipped, unit, "SAME"), None
                return tf.nn.conv2d(upstream, flipped, unit, pads), None

            return original(x, k), grad

        return convolution(tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel))

    return convolution_op


class GhostRecorder:
    """Records inputs and pre-activation outputs of rule layers in one forward pass; turns gradients into norms.

    Use (inside one ``tf.GradientTape``)::

        recorder = GhostRecorder(model, variables)
        with tf.GradientTape() as tape:
            with recorder:
                y_pred = model(x, training=False)
            objective = ...sum of per-example losses...
        squared = recorder.squared_norms(tape.gradient(objective, recorder.outputs()))

    Or reuse a training forward (BatchNorm on batch statistics)::

        recorder = GhostRecorder(model, variables)
        with tf.GradientTape(persistent=True) as tape:
            with recorder:
                y_pred = model(x, training=True)
            loss = ...mean loss... ; objective = ...sum of per-example losses...
        squared = recorder.squared_norms(recorder.output_gradients(tape, objective))
        grads = tape.gradient(loss, model.trainable_variables)   # the ordinary gradient

    Args:
        model: the Keras model.
        variables: the variables to measure.
    """

    def __init__(self, model: Any, variables: Sequence[Any]) -> None:
        owners: dict[int, list[tuple[Any, str]]] = {}
        for layer in _all_layers(model):
            for role, variable in _rule_roles(layer).items():
                if variable is not None:
                    owners.setdefault(id(variable), []).append((layer, role))
            for variable in getattr(layer, "_trainable_variables", []) or []:
                if not _rule_roles(layer):
                    owners.setdefault(id(variable), []).append((layer, "other"))
        self._variables = list(variables)
        self._unsupported: set[int] = set()
        self._layers: list[Any] = []
        self._role: dict[int, tuple[Any, str]] = {}
        for variable in self._variables:
            holders = owners.get(id(variable), [])
            if len(holders) != 1 or holders[0][1] == "other":
                self._unsupported.add(id(variable))
                continue
            layer, role = holders[0]
            self._role[id(variable)] = (layer, role)
            if layer not in self._layers:
                self._layers.append(layer)
        self._records: dict[int, list[list[Any]]] = {}
        self._switch = _Switch()
        # every plain BatchNorm layer is switched, measured or not
        self._norm_layers = [
            layer for layer in _all_layers(model)
            if type(layer).call is keras.layers.BatchNormalization.call and not layer.renorm
        ]
        self._statistics: dict[int, list[tuple[tf.Tensor, tf.Tensor]]] = {}

    # ------------------------------------------------------------- recording
    def __enter__(self) -> GhostRecorder:
        self._records = {}
        for layer in self._layers:
            original_call = layer.call
            record = self._records.setdefault(id(layer), [])

            def call(inputs, *args, _call=original_call, _record=record, _layer=layer, **kwargs):
                _record.append([inputs, None, None])
                outputs = _call(inputs, *args, **kwargs)
                if isinstance(_layer, keras.layers.BatchNormalization):
                    _record[-1][1] = outputs
                return outputs

            object.__setattr__(layer, "call", call)
            if not isinstance(layer, keras.layers.BatchNormalization):
                original_activation = layer.activation

                def activation(z, _activation=original_activation, _record=record):
                    if _record and _record[-1][1] is None:
                        _record[-1][1] = z
                    return _activation(z)

                object.__setattr__(layer, "activation", activation)
                layer.__dict__["_hvd_largebatch_activation"] = original_activation
            if transposes_by_forward_convolution(layer):
                object.__setattr__(layer, "convolution_op", _switched_convolution(self._switch, layer))
        self._statistics = {}
        for layer in self._norm_layers:
            object.__setattr__(layer, "_moments", self._switched_moments(layer))
        return self

    def _switched_moments(self, layer: Any):
        """``layer._moments`` for the recording pass: the batch statistics, recorded, through the switch."""
        moments = layer._moments
        statistics = self._statistics.setdefault(id(layer), [])

        def switched(inputs, mask):
            mean, variance = moments(inputs, mask)
            mean, variance = _switched_identity(self._switch, mean), _switched_identity(self._switch, variance)
            statistics.append((mean, variance))
            record = self._records.get(id(layer))
            if record:
                record[-1][2] = (mean, variance)
            return mean, variance

        return switched

    def batch_statistics(self) -> dict[Any, list[tuple[tf.Tensor, tf.Tensor]]]:
        """``{layer: [(mean, variance) per call]}`` of the BatchNorm layers that ran on batch statistics."""
        layers = {id(layer): layer for layer in self._norm_layers}
        return {layers[key]: values for key, values in self._statistics.items() if values}

    def __exit__(self, *exc) -> None:
        for layer in self._norm_layers:
            layer.__dict__.pop("_moments", None)
        for layer in self._layers:
            layer.__dict__.pop("call", None)
            layer.__dict__.pop("convolution_op", None)
            if "_hvd_largebatch_activation" in layer.__dict__:
                object.__setattr__(layer, "activation", layer.__dict__.pop("_hvd_largebatch_activation"))

    def _measured(self) -> list[Any]:
        return [
            layer for layer in self._layers
            if len(self._records.get(id(layer), [])) == 1 and self._records[id(layer)][0][1] is not None
        ]

    def unsupported(self) -> list[Any]:
        """The variables without a rule, shared, or whose layer did not run exactly once."""
        measured = {id(layer) for layer in self._measured()}
        return [
            v for v in self._variables
            if id(v) in self._unsupported or id(self._role[id(v)][0]) not in measured
        ]

    def outputs(self) -> list[Any]:
        """The recorded outputs whose gradients :meth:`squared_norms` needs, in a fixed order."""
        return [self._records[id(layer)][0][1] for layer in self._measured()]

    def output_gradients(self, tape: tf.GradientTape, objective: tf.Tensor) -> list[Any]:
        """Gradients of ``objective`` at :meth:`outputs`, with BatchNorm's batch statistics held constant."""
        outputs = self.outputs()
        if not outputs:
            return []
        self._switch.coupled = False
        try:
            return tape.gradient(objective, outputs)
        finally:
            self._switch.coupled = True

    def squared_norms(self, grads: Sequence[Any]) -> dict[int, tf.Tensor]:
        """``{id(variable): (B,) squared per-example gradient norms}`` for the measured variables."""
        result: dict[int, tf.Tensor] = {}
        for layer, grad in zip(self._measured(), grads):
            inputs, output, statistics = self._records[id(layer)][0]
            grad = tf.zeros_like(output) if grad is None else tf.convert_to_tensor(grad)
            if isinstance(layer, keras.layers.BatchNormalization):
                values = dict(zip(("gamma", "beta"), _batch_norm_squared_norms(layer, inputs, grad, statistics)))
            elif isinstance(layer, keras.layers.Dense):
                values = dict(zip(("kernel", "bias"), _dense_squared_norms(inputs, grad)))
            else:
                values = dict(zip(("kernel", "bias"), _conv_squared_norms(layer, inputs, grad)))
            for variable in self._variables:
                owner = self._role.get(id(variable))
                if owner is not None and owner[0] is layer and id(variable) not in self._unsupported:
                    result[id(variable)] = values[owner[1]]
        return result


def _gram_or_product(a: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """``||a_n^T g_n||_F^2`` for every ``n``, for ``a: (N, T, p)`` and ``g: (N, T, q)`` of static ``T, p, q``."""
    t, p, q = a.shape[1], a.shape[2], g.shape[2]
    if t == 1:
        return tf.reduce_sum(tf.square(a), [1, 2]) * tf.reduce_sum(tf.square(g), [1, 2])
    if t * t * (p + q) <= t * p * q:
        gram_a = tf.linalg.matmul(a, a, transpose_b=True)
        gram_g = tf.linalg.matmul(g, g, transpose_b=True)
        return tf.reduce_sum(gram_a * gram_g, [1, 2])
    return tf.reduce_sum(tf.square(tf.linalg.matmul(a, g, transpose_a=True)), [1, 2])


def _dense_squared_norms(inputs: Any, grad: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    a = tf.convert_to_tensor(inputs)
    batch = tf.shape(a)[0]
    a = tf.reshape(a, (batch, -1, a.shape[-1]))
    g = tf.reshape(tf.cast(grad, a.dtype), (batch, -1, grad.shape[-1]))
    if a.shape[1] is None:  # a dynamic number of positions: the product form needs no static T
        kernel = tf.reduce_sum(tf.square(tf.linalg.matmul(a, g, transpose_a=True)), [1, 2])
    else:
        kernel = _gram_or_product(a, g)
    return kernel, tf.reduce_sum(tf.square(tf.reduce_sum(g, 1)), 1)


#: Examples whose kernel gradients one loop step of :func:`_filter_gradient_squared_norms` forms.
_EXAMPLES_PER_STEP = 8

#: Largest static batch for which :func:`_filter_gradient_squared_norms` unrolls its per-example calls.
_UNROLLED_BATCH = 256


def conv_norm_form(layer: Any, positions: int) -> str:
    """How the per-example kernel norms of a convolution with ``positions`` output positions are evaluated.

    ``"gram"``: the Gram form on the input patches (cost per example and
    group ``~ L^2 (rows + filters/groups)``); ``"product"``: the per-example
    kernel gradients themselves (``~ L * rows * filters/groups``); the
    cheaper of the two by that count (the PyTorch function of this name
    asks the Gram form for a threefold advantage, measured there: its small
    batched products run slowly on CPUs). ``rows`` is
    ``channels/groups * prod(kernel_size)``. A 2-D product with a kernel
    larger than 1x1, one group and no dilation is TensorFlow's own
    weight-gradient convolution, one example at a time
    (:func:`uses_filter_gradient`); other products are batched matrix
    products on the patches.
    """
    rows = math.prod(int(size) for size in layer.kernel.shape[:-1])
    columns = layer.kernel.shape[-1] // layer.groups
    return "gram" if positions * (rows + columns) <= rows * columns else "product"


def uses_filter_gradient(layer: Any, positions: int) -> bool:
    """Whether a convolution's per-example kernel norms come from ``Conv2DBackpropFilter`` per example.

    True for a ``Conv2D`` in the product form (:func:`conv_norm_form`) with
    a kernel larger than 1x1, one group and dilation 1 (TensorFlow's CPU
    kernels do not dilate the weight gradient). On CPUs this beats the
    patches: ``tf.image.extract_patches`` and the strided copies are slower
    than the convolution itself. A 1x1 kernel's patches are the (strided)
    input, so the batched product on them stays.
    """
    return (
        len(layer.kernel_size) == 2
        and layer.groups == 1
        and all(rate == 1 for rate in layer.dilation_rate)
        and math.prod(layer.kernel_size) > 1
        and positions > 1
        and conv_norm_form(layer, positions) == "product"
    )


def _filter_gradient_squared_norms(layer: Any, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """``||kernel gradient of example n||^2`` for channels-last ``x: (B, H, W, C)`` and ``g: (B, H', W', F)``.

    Each example's kernel gradient is one ``Conv2DBackpropFilter``, squared
    and summed at once. A static batch of at most :data:`_UNROLLED_BATCH`
    examples is split into one-example views (no copies, no loop: 15-20%
    faster than the loop on CPUs, measured); otherwise a ``tf.map_fn`` runs
    over steps of :data:`_EXAMPLES_PER_STEP` examples (the batch padded with
    zero examples to a multiple), so at most that many kernel gradients
    exist at a time.
    """
    filter_sizes = tf.constant([int(size) for size in layer.kernel.shape], tf.int32)
    strides = [1, *layer.strides, 1]
    padding = "SAME" if layer.padding == "same" else "VALID"

    def half_squared_norm(xs: tf.Tensor, gs: tf.Tensor) -> tf.Tensor:  # one op fewer than square and sum
        return tf.nn.l2_loss(tf.raw_ops.Conv2DBackpropFilter(
            input=xs, filter_sizes=filter_sizes, out_backprop=gs, strides=strides, padding=padding,
        ))

    static_batch = x.shape[0]
    if static_batch is not None and static_batch <= _UNROLLED_BATCH:
        if static_batch == 0:
            return tf.zeros((0,), x.dtype)
        pairs = zip(tf.split(x, static_batch), tf.split(g, static_batch))
        return 2 * tf.stack([half_squared_norm(xs, gs) for xs, gs in pairs])

    step = _EXAMPLES_PER_STEP
    batch = tf.shape(x)[0]
    steps = (batch + step - 1) // step
    extra = steps * step - batch

    def in_steps(t: tf.Tensor) -> tf.Tensor:
        t = tf.pad(t, [[0, extra]] + [[0, 0]] * (len(t.shape) - 1))
        return tf.reshape(t, tf.concat([[steps, step], tf.shape(t)[1:]], 0))

    def norms(pair):
        xs, gs = pair
        return tf.stack([half_squared_norm(xs[j : j + 1], gs[j : j + 1]) for j in range(step)])

    halves = tf.map_fn(norms, (in_steps(x), in_steps(g)), fn_output_signature=tf.TensorSpec((step,), x.dtype))
    return 2 * tf.reshape(halves, (-1,))[:batch]


def _conv_squared_norms(layer: Any, inputs: Any, grad: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    x = tf.convert_to_tensor(inputs)
    g = tf.cast(grad, x.dtype)
    rank = len(layer.kernel_size)
    if layer.data_format == "channels_first":
        order = [0, *range(2, 2 + rank), 1]
        x, g = tf.transpose(x, order), tf.transpose(g, order)
    batch, filters = tf.shape(g)[0], g.shape[-1]
    positions = math.prod(g.shape[1:-1])
    bias = tf.reduce_sum(tf.square(tf.reduce_sum(tf.reshape(g, (batch, positions, filters)), 1)), 1)
    if uses_filter_gradient(layer, positions):
        return _filter_gradient_squared_norms(layer, x, g), bias
    if rank == 1:
        if layer.padding == "causal":
            x = tf.pad(x, [[0, 0], [layer.dilation_rate[0] * (layer.kernel_size[0] - 1), 0], [0, 0]])
        patches = _patches_1d(x, layer.kernel_size[0], layer.strides[0], layer.dilation_rate[0],
                              layer.padding == "same", positions)
    else:
        patches = tf.image.extract_patches(
            x, sizes=[1, *layer.kernel_size, 1], strides=[1, *layer.strides, 1], rates=[1, *layer.dilation_rate, 1],
            padding="SAME" if layer.padding == "same" else "VALID",
        )  # (B, H', W', kh*kw*C), channel fastest
    groups, channels = layer.groups, x.shape[-1]
    if groups == 1:
        a = tf.reshape(patches, (batch, positions, patches.shape[-1]))
        gg = tf.reshape(g, (batch, positions, filters))
        return _gram_or_product(a, gg), bias
    taps = patches.shape[-1] // channels
    a = tf.reshape(patches, (batch, positions, taps, groups, channels // groups))
    a = tf.reshape(tf.transpose(a, [0, 3, 1, 2, 4]), (batch * groups, positions, taps * channels // groups))
    gg = tf.reshape(g, (batch, positions, groups, filters // groups))
    gg = tf.reshape(tf.transpose(gg, [0, 2, 1, 3]), (batch * groups, positions, filters // groups))
    kernel = tf.reduce_sum(tf.reshape(_gram_or_product(a, gg), (batch, groups)), 1)
    return kernel, bias


def _patches_1d(x: tf.Tensor, size: int, stride: int, rate: int, same: bool, positions: int) -> tf.Tensor:
    """The input patches ``(B, positions, size*C)`` of a 1-D convolution on ``x: (B, L, C)``, channel fastest.

    As ``tf.image.extract_patches`` on a height-1 image, without it (its CPU
    kernel costs more than the product it feeds): ``x`` padded as the
    convolution pads it (``same``: the smaller half before) and to a
    multiple of ``stride``, viewed as ``(B, L/stride, stride*C)``, so that
    every tap is a slice of whole time steps; the taps are concatenated.
    """
    length, channels = x.shape[1], x.shape[2]
    span = (size - 1) * rate
    before = max((positions - 1) * stride + span + 1 - length, 0) // 2 if same else 0
    rows = positions + -(-span // stride)  # time steps of stride*C values that every tap lies in
    after = rows * stride - before - length
    x = tf.pad(x, [[0, 0], [before, max(after, 0)], [0, 0]])
    if after < 0:
        x = x[:, : rows * stride]
    x = tf.reshape(x, (-1, rows, stride * channels))
    taps = []
    for tap in range(size):
        start, phase = divmod(tap * rate, stride)
        taps.append(x[:, start : start + positions, phase * channels : (phase + 1) * channels])
    return taps[0] if size == 1 else tf.concat(taps, -1)


def _batch_norm_squared_norms(layer: Any, inputs: Any, grad: tf.Tensor, statistics: tuple | None) -> tuple[tf.Tensor, tf.Tensor]:
    """``xhat = (x - mean) / sqrt(variance + eps)`` with the batch's ``statistics``, or the moving ones when None."""
    x = tf.convert_to_tensor(inputs)
    dtype = tf.float64 if x.dtype == tf.float64 else tf.float32
    x, g = tf.cast(x, dtype), tf.cast(grad, dtype)
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    axes = [axis % len(x.shape) for axis in axes]
    shape = [x.shape[i] if i in axes else 1 for i in range(len(x.shape))]
    mean, variance = (layer.moving_mean, layer.moving_variance) if statistics is None else statistics
    mean = tf.reshape(tf.cast(mean, dtype), shape)
    variance = tf.reshape(tf.cast(variance, dtype), shape)
    reduce = [i for i in range(1, len(x.shape)) if i not in axes]
    # 1/sigma is applied to the per-channel sums: one full-size product fewer than forming xhat
    gamma = (tf.reduce_sum(g * (x - mean), reduce, keepdims=True) if reduce else g * (x - mean)) * tf.math.rsqrt(
        variance + layer.epsilon
    )
    beta = tf.reduce_sum(g, reduce) if reduce else g
    batch = tf.shape(x)[0]
    return (
        tf.reduce_sum(tf.square(tf.reshape(gamma, (batch, -1))), 1),
        tf.reduce_sum(tf.square(tf.reshape(beta, (batch, -1))), 1),
    )
