"""Keras 3 runner of ``hvd-largebatch bench``: trains one study run with ``model.fit`` under Horovod.

:func:`train_cell` is the Keras training a user of the package writes: the
optimizer from :func:`hvd_largebatch.tf.create_optimizer` wrapped in
:class:`~hvd_largebatch.tf.DistributedOptimizer` (gradients
averaged with one grouped allreduce), ``model.fit`` with
:class:`~hvd_largebatch.tf.callbacks.BroadcastGlobalVariablesCallback`,
the study's :class:`StudyMonitorCallback` (evaluation steps, targets,
divergence) and the per-batch LR callback over the run's core schedule
(:class:`~hvd_largebatch.tf.callbacks.GradualWarmupCallback` when the recipe
warms up, :class:`~hvd_largebatch.tf.callbacks.LearningRateScheduleCallback`
otherwise). CLARS trains through
:class:`~hvd_largebatch.tf.CLARSModel` (per-example gradient
norms) and ConAdv through :class:`~hvd_largebatch.tf.conadv.ConAdv` (dual
BatchNorm). The data come from :class:`MNIST1DShard`, a ``keras.utils.PyDataset``
that gives this rank its part of every global batch in the epoch order shared
by all ranks (:class:`hvd_largebatch.bench.data.ShardedBatches`).

:class:`HorovodCellRunner` is what :mod:`hvd_largebatch.bench.worker` loads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hvd_largebatch.bench.cell_runner import HorovodRunner, framework_versions, start_run, study_splits
from hvd_largebatch.bench.data import MNIST1D, ShardedBatches
from hvd_largebatch.bench.keras_model import mnist1d_convnet
from hvd_largebatch.bench.recipes import CellPlan
from hvd_largebatch.bench.run_monitor import RunMonitor
from hvd_largebatch.tf import CLARSModel, DistributedOptimizer, core_spelling, create_optimizer
from hvd_largebatch.tf.callbacks import (
    BroadcastGlobalVariablesCallback,
    GradualWarmupCallback,
    LearningRateScheduleCallback,
)

__all__ = [
    "HorovodCellRunner",
    "MNIST1DShard",
    "StudyMonitorCallback",
    "evaluate",
    "train_cell",
    "configure_threads",
]

_EVAL_CHUNK = 2048
def configure_threads() -> None:
    """TensorFlow thread pools sized from ``OMP_NUM_THREADS`` (the launcher gives each rank cores/W).

    Two inter-op threads let independent branches of a step (ConAdv's attack
    and clean pass) run side by side. Must run before TensorFlow executes anything.
    """
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))


class MNIST1DShard(keras.utils.PyDataset):
    """This rank's batches of one epoch after another, in the epoch order shared by all ranks.

    Batch ``i`` of epoch ``e`` is ``shards.indices(e, i)``; Keras calls
    ``on_epoch_end`` after each epoch, which moves to the next permutation.

    Args:
        x, y: the whole training set (the same on every rank).
        shards: which examples this rank takes.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, shards: ShardedBatches) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.x, self.y, self.shards = x, y, shards
        self.epoch = 0
        self._order = shards.epoch_indices(0)

    def __len__(self) -> int:
        return self.shards.steps_per_epoch

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._order[index]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self.shards.epoch_indices(self.epoch)


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, hvd: Any) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` over every rank's part of a split (one allreduce of sums).

    Each rank scores its part in inference mode (a ConAdv model uses its main BatchNorm).
    """
    totals = np.zeros(3, dtype=np.float64)
    for start in range(0, len(x), _EVAL_CHUNK):
        logits = keras.ops.convert_to_numpy(model(x[start : start + _EVAL_CHUNK], training=False))
        labels = y[start : start + _EVAL_CHUNK]
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        totals += (-log_probs[np.arange(len(labels)), labels].sum(), (logits.argmax(axis=1) == labels).sum(),
                   len(labels))
    totals = hvd.allreduce(totals, op=hvd.Sum, name="bench_evaluate").numpy()
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


class StudyMonitorCallback(keras.callbacks.Callback):
    """Feeds a :class:`~hvd_largebatch.bench.run_monitor.RunMonitor` after every batch and stops ``fit``.

    After each batch: one allreduce averages the ``fit`` loss over the ranks
    (the divergence rule) and the optimizer's skip count is read; at the
    evaluation steps the validation split is scored. When the monitor says
    the run is over (diverged, target reached, last step), ``stop_training``
    is set, which ``fit`` checks after every batch; every rank sees the same
    numbers and stops at the same step.

    Args:
        monitor: the run's monitor.
        x_val, y_val: this rank's part of the validation split.
        hvd: the initialised ``horovod.tensorflow`` module.
        optimizer: the inner optimizer (for ``skipped_steps``).
    """

    def __init__(self, monitor: RunMonitor, x_val: np.ndarray, y_val: np.ndarray, hvd: Any, optimizer: Any) -> None:
        super().__init__()
        self.monitor, self.x_val, self.y_val, self.hvd, self.optimizer = monitor, x_val, y_val, hvd, optimizer
        self._skipped = 0

    def _skipped_steps(self) -> int:
        return int(keras.ops.convert_to_numpy(getattr(self.optimizer, "skipped_steps", 0)))

    def on_train_begin(self, logs=None):
        self._skipped = self._skipped_steps()

    def on_train_batch_end(self, batch, logs=None):
        if self.monitor.stopped is not None:
            return
        loss = float((logs or {}).get("loss", float("nan")))
        mean_loss = float(self.hvd.allreduce(np.array([loss]), op=self.hvd.Average, name="bench_step").numpy()[0])
        skipped = self._skipped_steps() > self._skipped
        if self.monitor.after_step(mean_loss, skipped):
            self.model.stop_training = True
            return
        if self.monitor.wants_evaluation():
            val_loss, val_accuracy = evaluate(self.model, self.x_val, self.y_val, self.hvd)
            if self.monitor.after_evaluation(val_accuracy, val_loss):
                self.model.stop_training = True


def train_cell(
    plan: CellPlan,
    data: MNIST1D,
    hvd: Any,
    on_epoch: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Trains one study run of ``plan`` with ``model.fit`` on this rank (every rank calls it).

    The same protocol as the PyTorch runner: the last
    ``plan.study["validation_size"]`` training examples are the validation
    split, evaluated at the study's evaluation steps; the run stops when
    :class:`StudyMonitorCallback` says so; the test split is scored at the
    end. The Keras runner does not measure the gradient noise scale (its
    gradients are averaged inside the optimizer's ``apply``).

    Returns and raises as the PyTorch runner's ``train_cell`` (the result of
    :meth:`RunMonitor.result`; a ``ValueError`` from
    :func:`~hvd_largebatch.bench.cell_runner.start_run` for a plan made for another world size).
    """
    rank, size = hvd.rank(), hvd.size()
    monitor = start_run(plan, rank, size)
    monitor.noise = None
    keras.utils.set_random_seed(plan.seed)
    model = mnist1d_convnet(seed=plan.seed)
    schedule = plan.schedule
    inner = create_optimizer(
        plan.optimizer, learning_rate=schedule(0), **core_spelling.to_keras(plan.optimizer_args()),
        **plan.exclusions,
    )
    if plan.conadv is not None:
        from hvd_largebatch.tf.conadv import ConAdv
        from hvd_largebatch.tf.dual_bn import convert_to_dual_bn

        if plan.conadv["dual_bn"]:
            model = convert_to_dual_bn(model)
        # Rank-dependent seed: each rank draws its own random starts and target labels.
        model = ConAdv(model, seed=plan.seed * 1000 + rank, **plan.conadv)
    elif plan.optimizer == "clars":
        model = CLARSModel(model)
    model.compile(
        optimizer=DistributedOptimizer(inner),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    if schedule.warmup == "gradual" and schedule.warmup_steps > 0:
        lr_callback: keras.callbacks.Callback = GradualWarmupCallback(schedule)
    else:
        lr_callback = LearningRateScheduleCallback(schedule)
    x_train, y_train, x_val, y_val, x_test, y_test = study_splits(plan, data, rank, size)
    shards = ShardedBatches(len(x_train), plan.global_batch, rank, size, plan.seed)
    study_callback = StudyMonitorCallback(monitor, x_val, y_val, hvd, inner)
    started = time.perf_counter()
    model.fit(
        MNIST1DShard(x_train, y_train, shards),
        epochs=plan.epochs,
        verbose=0,
        callbacks=[BroadcastGlobalVariablesCallback(0), lr_callback, study_callback],
    )
    test_loss, test_accuracy = evaluate(model, x_test, y_test, hvd)
    return monitor.result(
        test_loss, test_accuracy,
        seconds=time.perf_counter() - started,
        skipped_steps=int(keras.ops.convert_to_numpy(getattr(inner, "skipped_steps", 0))),
        framework_versions=framework_versions(tensorflow=tf.__version__, keras=keras.__version__),
    )


def _train_fresh_cell(
    plan: CellPlan, data: MNIST1D, hvd: Any, on_epoch: Callable[[Mapping[str, Any]], None] | None
) -> dict[str, Any]:
    keras.backend.clear_session()  # each cell starts from a fresh graph state
    return train_cell(plan, data, hvd, on_epoch)


class HorovodCellRunner(HorovodRunner):
    """The cell runner :mod:`hvd_largebatch.bench.worker` uses: threads, ``hvd.init()``, broadcast, :func:`train_cell`."""

    def __init__(self) -> None:
        configure_threads()
        import horovod.tensorflow as hvd

        super().__init__(hvd, _train_fresh_cell, broadcast_name="hvd_largebatch_bench_job")
