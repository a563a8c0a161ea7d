"""BatchNorm moving statistics averaged over Horovod ranks: a function and a ``model.fit`` callback.

Horovod averages gradients, not BatchNorm's moving statistics: every rank
updates ``moving_mean`` and ``moving_variance`` from its own batches, so the
ranks drift apart during training, and a validation on each rank or a
checkpoint saved by rank 0 sees one rank's statistics. Averaging them over
the ranks, for every ``keras.layers.BatchNormalization`` (nested ones and
both halves of a :class:`~hvd_largebatch.tf.DualBatchNormalization` included)::

    mu      <- (1/n) * sum_r mu_r
    sigma^2 <- (1/n) * sum_r sigma^2_r

is the mean of the ranks' estimates of the same population statistics (the
mean of the variances, not the variance of the pooled data, which would add
the spread of the ranks' means; every rank's estimate comes from batches of
the same size). Only ``horovod.tensorflow`` ops are used, as everywhere in
:mod:`hvd_largebatch.tf`.

Example (under ``horovodrun``)::

    from hvd_largebatch.tf import AverageBatchNormStatistics, average_batchnorm_statistics
    model.fit(x, y, callbacks=[callbacks.BroadcastGlobalVariablesCallback(0), AverageBatchNormStatistics(),
                               keras.callbacks.ModelCheckpoint(...)])
    average_batchnorm_statistics(model)  # or by hand, e.g. before model.evaluate or model.save
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hvd_largebatch.tf import horovod_backend

__all__ = ["batchnorm_moving_statistics", "average_batchnorm_statistics", "AverageBatchNormStatistics"]


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"model must be a keras.Model (or layer), got {type(model).__name__}")


def _batchnorm_layers(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    return [
        layer for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def batchnorm_moving_statistics(model: keras.layers.Layer) -> list[keras.Variable]:
    """The ``moving_mean`` and ``moving_variance`` of every BatchNormalization in ``model``, nested ones included.

    The order is fixed by the model's structure (Keras's walk over its
    layers), so it is the same on every rank.

    Args:
        model: a built ``keras.Model`` or layer.

    Raises:
        ValueError: ``model`` is not a Keras model or layer.

    Example:
        >>> import keras
        >>> from hvd_largebatch.tf import batchnorm_moving_statistics
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn")],
        ...                          name="net")
        >>> [v.path for v in batchnorm_moving_statistics(model)]
        ['net/bn/moving_mean', 'net/bn/moving_variance']
    """
    _check_model(model)
    statistics = []
    for layer in _batchnorm_layers(model):
        if layer.built:
            statistics += [layer.moving_mean, layer.moving_variance]
    return statistics


def average_batchnorm_statistics(model: keras.layers.Layer) -> int:
    """Replaces every BatchNorm moving statistic of ``model`` by its average over the Horovod ranks.

    Call it on every rank (it is a collective operation). The ranks first
    compare how many statistics, of how many values, they hold (one small
    allgather), so that different models fail with the same error on every
    rank instead of hanging; then one grouped allreduce averages them all.

    Args:
        model: a built ``keras.Model`` or layer, the same on every rank.

    Returns:
        The number of BatchNormalization layers averaged (as the PyTorch twin,
        ``hvd_largebatch.torch_impl.average_batchnorm_statistics``).

    Raises:
        ValueError: ``model`` is not a Keras model or layer, or the ranks'
            models hold different BatchNorm statistics (on every rank).
        HorovodNotInitialisedError: ``hvd.init()`` was not called.
    """
    _check_model(model)
    hvd = horovod_backend.initialized_horovod()
    statistics = batchnorm_moving_statistics(model)
    layout = [len(statistics), sum(int(np.prod(v.shape)) for v in statistics)]
    layouts = hvd.allgather(
        tf.constant([layout], dtype=tf.int64), name="hvd_largebatch_batchnorm_statistics_layout"
    ).numpy().tolist()
    if any(row != layouts[0] for row in layouts):
        raise ValueError(
            "model must hold the same BatchNorm statistics on every rank; (variables, values) per rank: "
            f"{[tuple(row) for row in layouts]}"
        )
    layers = len(statistics) // 2
    if not statistics or hvd.size() == 1:
        return layers
    averaged = hvd.grouped_allreduce(
        [tf.convert_to_tensor(v.value) for v in statistics], op=hvd.Average,
        name="hvd_largebatch_batchnorm_statistics",
    )
    for variable, value in zip(statistics, averaged):
        variable.assign(value)
    return layers


class AverageBatchNormStatistics(keras.callbacks.Callback):
    """Averages the BatchNorm moving statistics over the ranks after the last training batch of every epoch.

    Runs :func:`average_batchnorm_statistics` right after an epoch's last
    batch (when ``fit`` knows the number of steps per epoch), so the
    validation inside ``fit`` and every ``on_epoch_end`` callback
    (``ModelCheckpoint``, ``BackupAndRestore``, ...) see statistics equal on
    all ranks. When the steps per epoch are unknown (a dataset of unknown
    length) it averages at the start of ``on_epoch_end``, which comes after
    the validation: put it before the checkpoint callbacks in the list.

    Raises:
        ValueError: at ``fit`` start, a model without a BatchNormalization layer.
    """

    def __init__(self):
        super().__init__()
        self.averaged_epochs = 0
        self._steps: int | None = None
        self._pending = False

    def on_train_begin(self, logs=None):
        if not _batchnorm_layers(self.model):
            raise ValueError(
                f"AverageBatchNormStatistics needs a model with BatchNormalization layers; {self.model.name} has none"
            )
        self._steps = (self.params or {}).get("steps")
        self._pending = False

    def _average(self) -> None:
        average_batchnorm_statistics(self.model)
        self.averaged_epochs += 1
        self._pending = False

    def on_train_batch_end(self, batch, logs=None):
        self._pending = True
        if self._steps is not None and batch + 1 >= self._steps:
            self._average()

    def on_epoch_end(self, epoch, logs=None):
        if self._pending:
            self._average()
