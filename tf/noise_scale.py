"""``NoiseScaleMonitor``: the gradient noise scale (critical batch) measured under ``model.fit`` on Horovod.

Under ``model.fit`` this package's :class:`~hvd_largebatch.tf.DistributedOptimizer`
owns the allreduce, so it measures: built with ``noise_scale_interval=N``, on
every ``N``-th update it stores, per variable, ``|G_s|^2`` (the mean over ranks
of each rank's local squared gradient norm, one allreduce; with one rank, the
mean over the micro-batches of gradient accumulation) and ``|G_B|^2`` (the
averaged gradient's). This callback reads each new measurement, feeds the
core :class:`hvd_largebatch.noise_scale.NoiseScaleEstimator`, and writes
``b_simple``, ``noise_scale_g2`` and ``noise_scale_s`` into the batch and
epoch logs, where ``History``, ``TensorBoard`` and ``CSVLogger`` see them.
The PyTorch monitor has the same names and meanings.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from hvd_largebatch import noise_scale as _core
from hvd_largebatch.tf.distributed import find_distributed_optimizer

__all__ = ["NoiseScaleMonitor", "LOG_KEYS"]

#: The keys this callback writes into the logs: ``B_simple``, ``EMA(G2)`` and ``EMA(S)``.
LOG_KEYS = ("b_simple", "noise_scale_g2", "noise_scale_s")


class NoiseScaleMonitor(_core.MonitorReadings, keras.callbacks.Callback):
    """Reports the gradient noise scale ``B_simple = EMA(S) / EMA(G2)`` of a ``model.fit`` run in its logs.

    McCandlish et al. 2018 (appendix A); the estimator and its batch sizes
    are the core's (:func:`hvd_largebatch.noise_scale.batch_sizes`):
    ``b_s = batch_size * backward_passes_per_step`` and ``b_B = k * b_s``
    with ``k > 1`` ranks; ``b_s = batch_size`` and
    ``b_B = backward_passes_per_step * batch_size`` with one rank. ``G2`` and
    ``S`` are in the units of the gradient of one pass's loss.

    The model's optimizer must be a :class:`~hvd_largebatch.tf.DistributedOptimizer`
    built with ``noise_scale_interval`` (the measurement is in its train
    step); put this callback before ``TensorBoard``/``CSVLogger`` so they see
    the values. With ``steps_per_execution > 1`` only the last measurement of
    each execution is read.

    Args:
        batch_size: examples per rank in one backward pass (``fit``'s ``batch_size``).
        ema_decay: decay of the averages per measurement, in [0, 1).
        per_tensor: also write ``b_simple/<variable path>`` into the epoch logs.

    Raises:
        ValueError: naming the argument, here for ``batch_size``, ``ema_decay``,
            ``per_tensor``; when training starts for a model without a
            ``DistributedOptimizer(noise_scale_interval=...)``, Horovod not
            initialised, or one rank with ``backward_passes_per_step`` < 2.

    Example:
        >>> import horovod.tensorflow as hvd  # doctest: +SKIP
        >>> from hvd_largebatch.tf import LARS, DistributedOptimizer, NoiseScaleMonitor  # doctest: +SKIP
        >>> opt = DistributedOptimizer(LARS(learning_rate=0.1), noise_scale_interval=1)  # doctest: +SKIP
        >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", jit_compile=False)  # doctest: +SKIP
        >>> history = model.fit(x, y, batch_size=64, callbacks=[NoiseScaleMonitor(batch_size=64)])  # doctest: +SKIP
        >>> history.history["b_simple"]  # doctest: +SKIP
    """

    def __init__(self, batch_size: int, ema_decay: float = _core.DEFAULT_EMA_DECAY, per_tensor: bool = False):
        super().__init__()
        self.batch_size = _core.check_batch_size(batch_size)
        self.ema_decay = _core.check_ema_decay(ema_decay)
        if not isinstance(per_tensor, bool):
            raise ValueError(f"per_tensor must be True or False, got {per_tensor!r}")
        self.per_tensor = per_tensor
        self.estimator: _core.NoiseScaleEstimator | None = None
        self.interval: int | None = None
        self._optimizer: Any = None
        self._seen = 0
        #: This rank's ``|G_s|^2`` entries before the allreduce, and the ``|G_s|^2`` and ``|G_B|^2``
        #: entries fed to the estimator, at the last measurement read (per variable with ``per_tensor``).
        self.last_local_sq_norms: list[float] = []
        self.last_small_sq_norms: list[float] = []
        self.last_big_sq_norms: list[float] = []

    def on_train_begin(self, logs=None):
        from hvd_largebatch.tf import horovod_backend

        if not horovod_backend.horovod_is_running():
            raise ValueError(_core.HOROVOD_NOT_INITIALISED.format(module="horovod.tensorflow"))
        import horovod.tensorflow as hvd

        optimizer = find_distributed_optimizer(getattr(self.model, "optimizer", None))
        if optimizer is None or optimizer.noise_scale_interval is None:
            raise ValueError(
                _core.NOT_DISTRIBUTED.format(optimizer=type(getattr(self.model, "optimizer", None)).__name__)
                + "; build it as DistributedOptimizer(..., noise_scale_interval=1)"
            )
        small, big = _core.batch_sizes(self.batch_size, hvd.size(), optimizer.backward_passes_per_step)
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        names = [v.path for v in optimizer._trainable_variables]
        if self.estimator is None or (self.estimator.small_batch, self.estimator.big_batch) != (small, big):
            self.estimator = _core.NoiseScaleEstimator(
                small, big, self.ema_decay, tensor_names=names if self.per_tensor else None
            )
        self.interval = optimizer.noise_scale_interval
        self._optimizer = optimizer
        self._seen = int(optimizer.noise_scale_measurements.numpy())

    def on_train_batch_end(self, batch, logs=None):
        count = int(self._optimizer.noise_scale_measurements.numpy())
        if count != self._seen:
            self._seen = count
            small = np.asarray(self._optimizer.noise_scale_small_sq.numpy(), dtype=np.float64)
            big = np.asarray(self._optimizer.noise_scale_big_sq.numpy(), dtype=np.float64)
            local = np.asarray(self._optimizer.noise_scale_local_sq.numpy(), dtype=np.float64)
            if not self.per_tensor:
                small, big, local = small.sum(keepdims=True), big.sum(keepdims=True), local.sum(keepdims=True)
            self.last_local_sq_norms = local.tolist()
            self.last_small_sq_norms, self.last_big_sq_norms = small.tolist(), big.tolist()
            self.estimator.update(small, big, step=int(self._optimizer.noise_scale_step.numpy()))
        if logs is not None:
            logs.update(self._values())

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.estimator is None:
            return
        logs.update(self._values())
        if self.per_tensor:
            for name, values in self.estimator.per_tensor().items():
                logs[f"b_simple/{name}"] = values["b_simple"]

    def _values(self) -> dict[str, float]:
        return dict(zip(LOG_KEYS, (self.b_simple, self.g2, self.s)))

    # ---------------------------------------------------------------- results
    # b_simple, g2, s, raw_g2, raw_s and advice() come from the core's MonitorReadings.
    @property
    def global_batch(self) -> int:
        """Examples behind one update: ``b_B`` (known once training started)."""
        if self.estimator is None:
            raise ValueError("global_batch is known once fit() has started")
        return self.estimator.big_batch

    def per_tensor_values(self) -> dict[str, dict[str, float]]:
        """``{variable path: {"b_simple", "g2", "s"}}`` (needs ``per_tensor=True``)."""
        if not self.per_tensor:
            raise ValueError("per_tensor_values() needs NoiseScaleMonitor(..., per_tensor=True)")
        return {} if self.estimator is None else self.estimator.per_tensor()

