"""``CLARSModel``: a Keras model wrapper whose ``train_step`` feeds CLARS its per-example gradient norms.

CLARS replaces ``||g||`` in the LARS trust ratio by the mean per-example
gradient norm over the global batch, which an optimizer that only receives
averaged gradients cannot compute. Wrap the model and ``fit`` as usual::

    model = CLARSModel(keras_model)
    model.compile(optimizer=DistributedOptimizer(CLARS(learning_rate=...)), loss=...,
                  jit_compile=False)
    model.fit(x, y, ...)

Each step does Keras's ordinary training step (forward in training mode,
loss, gradients, metrics) and, before the update, the estimator chosen on
the optimizer (``CLARS(estimator="exact" | "microbatch:k", chunk_size=...)``)
on this worker's batch (``exact``: ghost-norm rules for ``Dense``, ``Conv1D``,
``Conv2D`` and BatchNorm variables, the ``vectorized_map`` path for the rest,
see :mod:`hvd_largebatch.tf.per_example_norms`); when the optimizer is wrapped in
:class:`~hvd_largebatch.tf.DistributedOptimizer`, one allreduce sums the
norm sums and counts of all ranks, so ``s`` is the mean over the global batch.

BatchNorm: the per-example gradient of a network whose BatchNorm layers
normalise with the batch's statistics is not a per-example quantity (every
example moves the mean and variance). We take the usual convention of
per-sample-gradient methods: per-example gradients of the network that
normalises with *this batch's statistics held constant*. Concretely, the
training forward stores the batch statistics in the BN layers' moving
averages (momentum 0 for that call), the per-example pass runs in inference
mode (so it uses exactly those statistics; dropout is off), and the moving
averages are then set to what Keras's own update would have given. Training
itself (forward, gradients, moving averages) is identical to ``fit`` on the
unwrapped model. BatchNorm with ``renorm=True`` is refused.

With ``estimator="exact"`` and ``method="auto"``, when BatchNorm is the
model's only layer that behaves differently in training
(:func:`~hvd_largebatch.tf.ghost_norms.only_batch_norm_depends_on_training`:
no Dropout, noise or subclassed ``call``), the training forward *is* that
per-example pass with the batch statistics held constant: the ghost rules
take their activations and output gradients from Keras's own forward and
tape (the statistics' gradient switched off for the per-example backward,
see :class:`~hvd_largebatch.tf.ghost_norms.GhostRecorder`), and BatchNorm
trains with its own momentum. Only variables without a rule (and, when a
BatchNorm layer runs twice, all variables) still take the inference-mode
pass above. The numbers are the same (tested in float64).

Scope: a model with one output and one loss given to ``compile`` (string,
function or ``keras.losses.Loss``). Sample weights and regularisation losses
enter the training loss as usual but not the per-example norms.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from hvd_largebatch import config
from hvd_largebatch.tf import horovod_backend
from hvd_largebatch.tf.distributed import find_distributed_optimizer, innermost_optimizer
from hvd_largebatch.tf.large_batch_optimizer import tensor_path
from hvd_largebatch.tf.momentum_optimizers import CLARS
from hvd_largebatch.tf.ghost_norms import GhostRecorder, only_batch_norm_depends_on_training
from hvd_largebatch.tf.per_example_norms import (
    exact_norm_sums,
    exact_norm_sums_by_rules,
    norm_dtype,
    per_example_grad_norm_sums,
)

__all__ = ["CLARSModel", "batch_norm_layers"]


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every trainable ``BatchNormalization`` layer inside ``model``, nested models included."""
    found, stack, seen = [], list(getattr(model, "layers", [])), set()
    while stack:
        layer = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.trainable:
                found.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return found


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class CLARSModel(keras.Model):
    """Wraps ``model`` so that ``fit`` with a :class:`~hvd_largebatch.tf.CLARS` optimizer just works.

    See the module docstring for what a step does and how BatchNorm is treated.

    Args:
        model: a built single-output Keras model.
        method: how ``estimator="exact"`` measures: ``"auto"`` (ghost-norm
            rules where a layer has one, ``vectorized_map`` for the rest) or
            ``"vmap"`` (the ``vectorized_map`` reference for every variable).
        **kwargs: ``keras.Model`` arguments (``name``, ...).

    Raises:
        ValueError: ``model`` is not a Keras model; at the first step, when
            the compiled optimizer is not CLARS (possibly wrapped), when the
            loss is not a single loss, when a BatchNorm layer uses renorm, or
            with ``backward_passes_per_step > 1``.

    Example:
        >>> import keras, numpy as np
        >>> from hvd_largebatch.tf import CLARS, CLARSModel
        >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model = CLARSModel(inner)
        >>> model.compile(optimizer=CLARS(learning_rate=0.1, estimator="microbatch:4"),
        ...               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> history = model.fit(np.ones((8, 4)), np.zeros(8), batch_size=8, verbose=0)
        >>> sorted(history.history)
        ['loss']
    """

    def __init__(self, model: keras.Model, method: str = "auto", **kwargs: Any):
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model, got {model!r}")
        method = config.check_choice("method", method, config.EXACT_NORM_METHODS)
        super().__init__(**kwargs)
        self.inner_model = model
        self.method = method

    def call(self, inputs, training=None):
        return self.inner_model(inputs, training=training)

    def build(self, input_shape=None):
        if not self.inner_model.built:
            self.inner_model.build(input_shape)
        self.built = True

    # --------------------------------------------------------------- training
    def _clars_optimizer(self) -> CLARS:
        inner = innermost_optimizer(self.optimizer)
        if not isinstance(inner, CLARS):
            raise ValueError(
                f"CLARSModel needs a CLARS optimizer (possibly inside DistributedOptimizer), got {type(inner).__name__}"
            )
        distributed = find_distributed_optimizer(self.optimizer)
        if distributed is not None and distributed.backward_passes_per_step != 1:
            raise ValueError("CLARSModel supports backward_passes_per_step=1 only")
        return inner

    def _per_example_loss(self):
        """``(loss_of_outputs, loss_of_batch)``: the mean loss from outputs, and from inputs (inference mode)."""
        loss = self.loss
        if isinstance(loss, (dict, list, tuple)) or loss is None:
            raise ValueError(f"CLARSModel needs one loss for one output in compile(), got loss={loss!r}")
        loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss

        def loss_of_outputs(y, y_pred):
            value = loss_fn(y, y_pred)
            return ops.mean(value) if len(value.shape) else value

        def loss_of_batch(x, y):
            return loss_of_outputs(y, self(x, training=False))

        return loss_of_outputs, loss_of_batch

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        clars = self._clars_optimizer()
        loss_of_outputs, loss_of_batch = self._per_example_loss()
        norm_layers = batch_norm_layers(self.inner_model)
        for layer in norm_layers:
            if layer.renorm:
                raise ValueError(f"CLARSModel does not support BatchNormalization(renorm=True) ({layer.name})")
        fused = (
            clars.estimator == "exact" and self.method == "auto" and tf.is_tensor(x)
            and only_batch_norm_depends_on_training(self.inner_model)
        )
        if fused:
            return self._fused_train_step(x, y, sample_weight, clars, loss_of_outputs)
        saved = [(tf.identity(layer.moving_mean.value), tf.identity(layer.moving_variance.value)) for layer in norm_layers]
        momenta = [layer.momentum for layer in norm_layers]

        # 1. Keras's training step, with BN keeping this batch's statistics as its moving ones.
        for layer in norm_layers:
            layer.momentum = 0.0
        try:
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
                scaled_loss = self.optimizer.scale_loss(loss)
        finally:
            for layer, momentum in zip(norm_layers, momenta):
                layer.momentum = momentum
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)

        if not self.optimizer.built:
            self.optimizer.build(variables)

        # 2. Per-example norms (inference mode: BN uses the batch statistics just stored).
        if clars.estimator == "exact" and self.method == "auto" and tf.is_tensor(x):
            sums, count = exact_norm_sums_by_rules(self.inner_model, loss_of_outputs, variables, x, y, clars.chunk_size)
        else:
            sums, count = per_example_grad_norm_sums(
                loss_of_batch, variables, x, y, estimator=clars.estimator, chunk_size=clars.chunk_size
            )
        self._set_grad_norms(clars, variables, sums, count)

        # 3. Moving averages as Keras's update would have left them: old * m + batch * (1 - m).
        for layer, (old_mean, old_var), momentum in zip(norm_layers, saved, momenta):
            for variable, old in ((layer.moving_mean, old_mean), (layer.moving_variance, old_var)):
                batch_stat = tf.identity(variable.value)
                updated = old * momentum + batch_stat * (1.0 - momentum)
                variable.assign(tf.where(tf.equal(batch_stat, old), old, updated))

        # 4. Update and metrics, as Keras does.
        return self._apply_and_measure(x, y, y_pred, sample_weight, loss, grads, variables)

    def _set_grad_norms(self, clars: CLARS, variables: list, sums: tf.Tensor, count: tf.Tensor) -> None:
        if find_distributed_optimizer(self.optimizer) is not None:
            hvd = horovod_backend.initialized_horovod()
            total = hvd.allreduce(tf.concat([sums, tf.reshape(count, (1,))], 0), op=hvd.Sum, name="clars_norm_sums")
            sums, count = total[:-1], total[-1]
        means = ops.unstack(sums / count, num=len(variables))
        clars.set_grad_norms({tensor_path(v): s for v, s in zip(variables, means)})

    def _apply_and_measure(self, x, y, y_pred, sample_weight, loss, grads, variables):
        self.optimizer.apply_gradients(zip(grads, variables))
        batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=batch_size)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _fused_train_step(self, x, y, sample_weight, clars: CLARS, loss_of_outputs):
        """The step with the exact ghost-norm estimator reusing Keras's training forward.

        Only when BatchNorm is the model's only training-dependent layer
        (:func:`~hvd_largebatch.tf.ghost_norms.only_batch_norm_depends_on_training`),
        so the training forward with the batch statistics held constant is the
        inference-mode pass of the other steps: the per-example output
        gradients come from the same tape with BatchNorm's statistics switched
        off (:class:`~hvd_largebatch.tf.ghost_norms.GhostRecorder`), BatchNorm
        trains with its own momentum. Variables without a rule, or every
        variable when a BatchNorm layer ran more than once, are measured as
        in the other steps, by an inference-mode pass with the moving
        statistics set to the (last) batch statistics for its duration.
        """
        variables = self.trainable_variables
        recorder = GhostRecorder(self.inner_model, variables)
        with tf.GradientTape(persistent=True) as tape:
            with recorder:
                y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            scaled_loss = self.optimizer.scale_loss(loss)
            one = lambda example: loss_of_outputs(example[0][None], example[1][None])  # noqa: E731
            objective = tf.reduce_sum(tf.vectorized_map(one, (y, y_pred)))
        statistics = recorder.batch_statistics()
        once = all(len(values) == 1 for values in statistics.values())
        squared = recorder.squared_norms(recorder.output_gradients(tape, objective)) if once else {}
        grads = tape.gradient(scaled_loss, variables)
        del tape
        if not self.optimizer.built:
            self.optimizer.build(variables)

        dtype = norm_dtype(variables)
        rest = [v for v in variables if id(v) not in squared]
        rest_sums = {}
        if rest:
            # BatchNorm at the batch statistics for the inference-mode pass, then back to the trained moving ones
            trained = [(layer, tf.identity(layer.moving_mean.value), tf.identity(layer.moving_variance.value))
                       for layer in statistics]
            for layer, values in statistics.items():
                layer.moving_mean.assign(tf.cast(tf.reshape(values[-1][0], layer.moving_mean.shape), layer.moving_mean.dtype))
                layer.moving_variance.assign(
                    tf.cast(tf.reshape(values[-1][1], layer.moving_variance.shape), layer.moving_variance.dtype)
                )
            if once:
                loss_of_batch = lambda xb, yb: loss_of_outputs(yb, self.inner_model(xb, training=False))  # noqa: E731
                totals, _ = exact_norm_sums(loss_of_batch, rest, x, y, clars.chunk_size)
            else:
                totals, _ = exact_norm_sums_by_rules(self.inner_model, loss_of_outputs, rest, x, y, clars.chunk_size)
            rest_sums = {id(v): totals[index] for index, v in enumerate(rest)}
            for layer, mean, variance in trained:
                layer.moving_mean.assign(mean)
                layer.moving_variance.assign(variance)
        sums = tf.stack([
            rest_sums[id(v)] if id(v) in rest_sums else tf.reduce_sum(tf.sqrt(tf.maximum(tf.cast(squared[id(v)], dtype), 0)))
            for v in variables
        ])
        self._set_grad_norms(clars, variables, sums, tf.cast(tf.shape(x)[0], dtype))
        return self._apply_and_measure(x, y, y_pred, sample_weight, loss, grads, variables)

    # ---------------------------------------------------------- serialisation
    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "method": self.method,
            "model": keras.saving.serialize_keras_object(self.inner_model),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects=None) -> CLARSModel:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("model"), custom_objects=custom_objects)
        return cls(inner, **config)
