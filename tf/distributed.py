"""``DistributedOptimizer``: Horovod gradient averaging in front of any Keras 3 optimizer.

Horovod's ``horovod.tensorflow.keras.DistributedOptimizer`` fails on Keras 3
(``'Variable' object has no attribute 'ref'``). This wrapper is a Keras 3
optimizer of its own, in the manner of ``keras.optimizers.LossScaleOptimizer``:
its :meth:`~DistributedOptimizer.apply` averages the gradients across ranks
with one ``horovod.tensorflow.grouped_allreduce`` and hands them to the wrapped
optimizer, whose hyperparameters, learning rate, iteration count and state
remain the ones in use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from hvd_largebatch import config
from hvd_largebatch import noise_scale as noise_scale_core
from hvd_largebatch.tf import horovod_backend

__all__ = ["DistributedOptimizer", "REDUCTION_OPS", "COMPRESSIONS", "MIXED_FLOAT16_MESSAGE", "innermost_optimizer"]

#: Reductions of the gradients across ranks (Horovod's Average, Sum, Adasum).
REDUCTION_OPS = ("average", "sum", "adasum")
#: Wire formats of the allreduce: none, or float16 (Horovod's Compression.fp16).
COMPRESSIONS = ("none", "fp16")
#: Why keras.optimizers.LossScaleOptimizer around a DistributedOptimizer is refused, and what to write instead.
MIXED_FLOAT16_MESSAGE = (
    "keras.optimizers.LossScaleOptimizer cannot wrap hvd_largebatch.tf.DistributedOptimizer: it decides on each "
    "rank's local gradients whether to skip the step, so a rank whose batch overflows skips the allreduce and the "
    "other ranks wait for it forever. model.compile adds that wrapper under the 'mixed_float16' dtype policy. "
    "Pass optimizer=hvd_largebatch.tf.DistributedLossScaleOptimizer(DistributedOptimizer(...)) to model.compile "
    "instead: it averages the gradients first and takes the skip and loss-scale decision on the average, the same "
    "on every rank"
)


def innermost_optimizer(optimizer: Any) -> Any:
    """Follows ``inner_optimizer`` links (DistributedOptimizer, LossScaleOptimizer) to the optimizer that updates."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def find_distributed_optimizer(optimizer: Any) -> DistributedOptimizer | None:
    """The :class:`DistributedOptimizer` in a chain of wrappers, or None."""
    while optimizer is not None:
        if isinstance(optimizer, DistributedOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class DistributedOptimizer(keras.optimizers.Optimizer):
    """Averages gradients over Horovod ranks, then lets the wrapped optimizer update.

    Each ``apply`` (that is, each training step of ``model.fit``) does::

        g_avg = allreduce_average(g)        # one grouped allreduce over all gradients
        optimizer.apply(g_avg)

    With ``backward_passes_per_step=k`` the local gradients of ``k``
    consecutive calls are summed first, and every ``k``-th call averages
    ``sum / k`` across ranks and updates: a global batch of
    ``per_worker_batch * world_size * k``. The wrapped optimizer's
    ``iterations`` then counts updates, not backward passes.

    The wrapper keeps nothing of its own but the accumulators: ``learning_rate``
    (get and set), ``iterations`` and ``get_config()['optimizer']`` are the
    wrapped optimizer's, and ``variables`` lists the accumulators followed by
    the wrapped optimizer's variables, which is what
    :class:`~hvd_largebatch.tf.callbacks.BroadcastGlobalVariablesCallback`
    broadcasts and ``model.save()`` writes. Gradients given as
    ``tf.IndexedSlices`` are made dense before the allreduce.

    Works under ``model.fit`` with ``jit_compile=False`` (on CPU ``"auto"``
    resolves to False). Horovod's ops have no XLA kernels, so a
    ``jit_compile=True`` step is refused with a ``ValueError`` while it is
    traced; on GPU machines, where ``"auto"`` may pick XLA, pass
    ``jit_compile=False``.

    Under the ``mixed_float16`` policy, wrap it in
    :class:`~hvd_largebatch.tf.DistributedLossScaleOptimizer`;
    ``keras.optimizers.LossScaleOptimizer`` around it (which ``model.compile``
    adds under that policy) is refused with a ``ValueError`` at compile time,
    since its local skip decision would hang the allreduce.

    Args:
        optimizer: any ``keras.optimizers.Optimizer`` (Keras's SGD, Adam, ...,
            or this package's LARS, CLARS, LAMB, SGD).
        op: ``"average"`` (default), ``"sum"`` or ``"adasum"``.
        compression: None or ``"none"``, or ``"fp16"`` to send float16 on the wire.
        backward_passes_per_step: local gradient accumulations per update (>= 1).
        noise_scale_interval: None (default, off), or measure the squared
            gradient norms of the gradient noise scale every that many updates
            for :class:`hvd_largebatch.tf.NoiseScaleMonitor` (see there).
        name: the wrapper's name (default ``"distributed_<inner name>"``).

    Raises:
        ValueError: naming the argument, for an invalid value.

    Example:
        >>> import horovod.tensorflow as hvd  # doctest: +SKIP
        >>> from hvd_largebatch.tf import LARS, DistributedOptimizer  # doctest: +SKIP
        >>> hvd.init()  # doctest: +SKIP
        >>> opt = DistributedOptimizer(LARS(learning_rate=0.1, weight_decay=5e-4))  # doctest: +SKIP
        >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", jit_compile=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        op: str = "average",
        compression: str | None = None,
        backward_passes_per_step: int = 1,
        noise_scale_interval: int | None = None,
        name: str | None = None,
    ):
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(f"optimizer must be a keras.optimizers.Optimizer instance, got {optimizer!r}")
        if find_distributed_optimizer(optimizer) is not None:
            raise ValueError("optimizer is already a DistributedOptimizer (or wraps one): wrap it only once")
        config.check_choice("op", op, REDUCTION_OPS)
        compression = "none" if compression is None else compression
        config.check_choice("compression", compression, COMPRESSIONS)
        backward_passes_per_step = config.check_positive_int("backward_passes_per_step", backward_passes_per_step)
        if noise_scale_interval is not None:
            noise_scale_interval = noise_scale_core.check_interval(noise_scale_interval, "noise_scale_interval")
            if op == "adasum":
                raise ValueError(noise_scale_core.UNSUPPORTED_OP.format(op=op))
        super().__init__(learning_rate=0.0, name=name or f"distributed_{optimizer.name}")
        # The wrapper's own iteration and learning-rate variables would only shadow the inner ones.
        self._untrack_variable(self._iterations)
        self._untrack_variable(self._learning_rate)
        self.inner_optimizer = optimizer
        self.op = op
        self.compression = compression
        self.backward_passes_per_step = backward_passes_per_step
        self.noise_scale_interval = noise_scale_interval
        self._built_by_init = True

    # ----------------------------------------------------------- pass-through
    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def variables(self):
        return self._variables[:] + self.inner_optimizer.variables

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    # ------------------------------------------------------------------ build
    def build(self, var_list: Sequence[Any]) -> None:
        if self.built:
            return
        var_list = list(var_list)
        self.inner_optimizer.build(var_list)
        if self.backward_passes_per_step > 1:
            self.accumulated_gradients = self.add_optimizer_variables(var_list, "accumulated_gradient")
            self.local_passes = self.add_variable((), initializer="zeros", dtype="int", name="local_passes")
        if self.noise_scale_interval is not None:
            n = len(var_list)

            def vector(name):
                return self.add_variable((n,), initializer="zeros", dtype="float64", name=name)

            # This rank's local |g|^2, |G_s|^2 and |G_B|^2 per variable at the last measurement, and its update.
            self.noise_scale_local_sq = vector("noise_scale_local_sq")
            self.noise_scale_small_sq = vector("noise_scale_small_sq")
            self.noise_scale_big_sq = vector("noise_scale_big_sq")
            self.noise_scale_step = self.add_variable((), initializer="zeros", dtype="int64", name="noise_scale_step")
            self.noise_scale_measurements = self.add_variable(
                (), initializer="zeros", dtype="int64", name="noise_scale_measurements"
            )
            if self.backward_passes_per_step > 1:  # one rank: the sum of the passes' squared norms so far
                self.noise_scale_pass_sq = vector("noise_scale_pass_sq")
        super().build(var_list)

    def __setattr__(self, name, value):
        # keras.optimizers.Optimizer.__init__ writes loss_scale_factor = None; after our __init__ only a
        # LossScaleOptimizer that wraps this one does (model.compile adds one under the mixed_float16 policy).
        if (
            name == "loss_scale_factor"
            and self.__dict__.get("_built_by_init")
            and not self.__dict__.get("_distributed_loss_scaling")
        ):
            raise ValueError(MIXED_FLOAT16_MESSAGE)
        super().__setattr__(name, value)

    # ----------------------------------------------------------------- update
    def apply(self, grads, trainable_variables=None):
        self.average_then_update(grads, trainable_variables, self.inner_optimizer.apply)

    def average_then_update(self, grads, trainable_variables, update) -> None:
        """Averages ``grads`` across ranks (after local accumulation), then calls ``update(averaged, variables)``.

        :meth:`apply` passes the wrapped optimizer's ``apply``;
        :class:`~hvd_largebatch.tf.DistributedLossScaleOptimizer` passes its
        loss-scale decision, so that it is taken on the averaged gradients.
        """
        horovod_backend.refuse_xla("hvd_largebatch.tf.DistributedOptimizer")
        hvd = horovod_backend.initialized_horovod()
        if trainable_variables is None:
            if not self.built:
                raise ValueError("pass trainable_variables on the first apply(), or build the optimizer first")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        grads = list(grads)
        if len(grads) != len(trainable_variables):
            raise ValueError(f"got {len(grads)} gradients for {len(trainable_variables)} variables")
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            raise ValueError("No gradients provided for any variable.")
        variables = [trainable_variables[i] for i in present]
        local = [ops.cast(tf.convert_to_tensor(grads[i]), trainable_variables[i].dtype) for i in present]

        if self.backward_passes_per_step == 1:
            averaged = self._allreduce(hvd, local)
            if self.noise_scale_interval is not None:
                self._measure_noise_scale(hvd, variables, local, averaged)
            update(averaged, variables)
            return

        k = self.backward_passes_per_step
        accumulators = [self.accumulated_gradients[self._get_variable_index(v)] for v in variables]
        is_update = ops.equal((self.local_passes + 1) % k, 0)

        def average_and_update():
            mean = [(acc + g) / ops.cast(k, g.dtype) for acc, g in zip(accumulators, local)]
            averaged = self._allreduce(hvd, mean)
            if self.noise_scale_interval is not None:
                self._measure_noise_scale(hvd, variables, mean, averaged, last_pass=local)
            update(averaged, variables)
            for acc in accumulators:
                acc.assign(ops.zeros_like(acc))

        def accumulate():
            for acc, g in zip(accumulators, local):
                acc.assign_add(g)
            if self.noise_scale_interval is not None and hvd.size() == 1:
                tf.cond(self._is_noise_scale_step(), lambda: self._add_pass_sq(variables, local), tf.no_op)

        ops.cond(is_update, average_and_update, accumulate)
        self.local_passes.assign_add(ops.cast(1, self.local_passes.dtype))

    # ---------------------------------------------------------- noise scale
    def _is_noise_scale_step(self):
        return ops.equal(self.iterations % self.noise_scale_interval, 0)

    def _sq_norms(self, variables, tensors):
        """One float64 ``|t|^2`` per variable of the optimizer (0 for variables without a gradient)."""
        values = [tf.zeros((), tf.float64)] * len(self._trainable_variables)
        for v, t in zip(variables, tensors):
            values[self._get_variable_index(v)] = tf.cast(tf.reduce_sum(tf.square(t)), tf.float64)
        return tf.stack(values)

    def _add_pass_sq(self, variables, local):
        self.noise_scale_pass_sq.assign_add(self._sq_norms(variables, local))
        return tf.no_op()

    def _measure_noise_scale(self, hvd, variables, local, averaged, last_pass=None):
        """Stores ``|G_s|^2`` and ``|G_B|^2`` per variable on every ``noise_scale_interval``-th update.

        ``k > 1`` ranks: ``|G_s|^2`` is the mean over ranks (one allreduce) of
        the local gradient's squared norm (the mean of the passes with
        gradient accumulation). One rank: the mean over the passes of each
        pass's squared norm. ``|G_B|^2`` is the averaged gradient's.
        """
        size = hvd.size()
        noise_scale_core.batch_sizes(1, size, self.backward_passes_per_step)  # one rank needs micro-batches

        def measure():
            if size > 1:
                local_sq = self._sq_norms(variables, local)
                small = hvd.allreduce(local_sq, op=hvd.Average, name="hvd_largebatch_noise_scale_local_sq_norm")
            else:
                passes = self.backward_passes_per_step
                small = local_sq = (self.noise_scale_pass_sq + self._sq_norms(variables, last_pass)) / passes
                self.noise_scale_pass_sq.assign(tf.zeros_like(self.noise_scale_pass_sq))
            big = self._sq_norms(variables, averaged)
            if self.op == "sum":
                big = big / float(size * size)
            self.noise_scale_local_sq.assign(local_sq)
            self.noise_scale_small_sq.assign(small)
            self.noise_scale_big_sq.assign(big)
            self.noise_scale_step.assign(ops.cast(self.iterations, "int64"))
            self.noise_scale_measurements.assign_add(tf.constant(1, tf.int64))
            return tf.no_op()

        tf.cond(self._is_noise_scale_step(), measure, tf.no_op)

    def apply_gradients(self, grads_and_vars):
        grads, variables = zip(*grads_and_vars)
        self.apply(grads, variables)
        return self.iterations

    def _allreduce(self, hvd, tensors):
        reduction = {"average": hvd.Average, "sum": hvd.Sum, "adasum": hvd.Adasum}[self.op]
        compression = hvd.Compression.fp16 if self.compression == "fp16" else hvd.Compression.none
        return hvd.grouped_allreduce(tensors, op=reduction, compression=compression)

    def update_step(self, gradient, variable, learning_rate):
        raise NotImplementedError("DistributedOptimizer delegates every update to its wrapped optimizer: call apply()")

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise ValueError("DistributedOptimizer works with the TensorFlow backend's stateful apply() only")

    # ----------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "op": self.op,
            "compression": self.compression,
            "backward_passes_per_step": self.backward_passes_per_step,
            "noise_scale_interval": self.noise_scale_interval,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects=None) -> DistributedOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)
