"""Keras 3 cell runner of ``hvd-largebatch bench``: trains one sweep cell with ``model.fit`` under Horovod.

:func:`train_cell` is the Keras training a user of the package writes: the
optimizer from :func:`hvd_largebatch.tf.create_optimizer` wrapped in
:class:`~hvd_largebatch.tf.DistributedOptimizer` (gradients
averaged with one grouped allreduce), ``model.fit`` with
:class:`~hvd_largebatch.tf.callbacks.BroadcastGlobalVariablesCallback`,
:class:`~hvd_largebatch.tf.callbacks.MetricAverageCallback` and the per-batch
LR callback over the cell's core schedule
(:class:`~hvd_largebatch.tf.callbacks.GradualWarmupCallback` when the recipe
warms up, :class:`~hvd_largebatch.tf.callbacks.LearningRateScheduleCallback`
otherwise). CLARS trains through
:class:`~hvd_largebatch.tf.CLARSModel` (per-example gradient
norms) and ConAdv through :class:`~hvd_largebatch.tf.conadv.ConAdv` (dual
BatchNorm). The data come from :class:`MNIST1DShard`, a ``keras.utils.PyDataset``
that gives this rank its part of every global batch in the epoch order shared
by all ranks (:class:`hvd_largebatch.data.ShardedBatches`).

:class:`HorovodCellRunner` is what :mod:`hvd_largebatch.bench_worker` loads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hvd_largebatch.data import MNIST1D, ShardedBatches, shard_of
from hvd_largebatch.recipes import CellPlan
from hvd_largebatch.tf import CLARSModel, DistributedOptimizer, core_spelling, create_optimizer
from hvd_largebatch.tf.callbacks import (
    BroadcastGlobalVariablesCallback,
    GradualWarmupCallback,
    LearningRateScheduleCallback,
    MetricAverageCallback,
)
from hvd_largebatch.tf.models import mnist1d_convnet

__all__ = [
    "HorovodCellRunner",
    "MNIST1DShard",
    "TestSetEvaluation",
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


class TestSetEvaluation(keras.callbacks.Callback):
    """After each epoch: test loss and accuracy over every rank's part of the test set, and a report.

    Each rank scores its part (inference mode; a ConAdv model uses its main
    BatchNorm), then one allreduce sums ``(loss, correct, count)``.

    Args:
        x, y: this rank's part of the test set.
        epochs: the total number of epochs (for the report).
        hvd: the initialised ``horovod.tensorflow`` module.
        on_epoch: called with the epoch's report.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, epochs: int, hvd: Any,
                 on_epoch: Callable[[Mapping[str, Any]], None] | None) -> None:
        super().__init__()
        self.x, self.y, self.epochs, self.hvd, self.on_epoch = x, y, epochs, hvd, on_epoch
        self.history: list[dict[str, Any]] = []
        self._epoch_start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def evaluate(self) -> tuple[float, float]:
        totals = np.zeros(3, dtype=np.float64)
        for start in range(0, len(self.x), _EVAL_CHUNK):
            logits = keras.ops.convert_to_numpy(self.model(self.x[start : start + _EVAL_CHUNK], training=False))
            labels = self.y[start : start + _EVAL_CHUNK]
            shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            totals += (-log_probs[np.arange(len(labels)), labels].sum(), (logits.argmax(axis=1) == labels).sum(),
                       len(labels))
        totals = self.hvd.allreduce(totals, op=self.hvd.Sum, name="bench_evaluate").numpy()
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        test_loss, test_accuracy = self.evaluate()
        report = {
            "epoch": epoch + 1,
            "epochs": self.epochs,
            "train_loss": float(logs.get("loss", float("nan"))),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "lr": float(logs.get("learning_rate", float("nan"))),
            "seconds": time.perf_counter() - self._epoch_start,
        }
        self.history.append(report)
        if self.on_epoch is not None:
            self.on_epoch(report)


def train_cell(
    plan: CellPlan,
    data: MNIST1D,
    hvd: Any,
    on_epoch: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Trains ``plan`` with ``model.fit`` on this rank (every rank calls it) and returns the cell's result.

    Returns the same fields as the PyTorch runner: ``test_accuracy``,
    ``test_loss``, ``train_loss`` (last epoch's ``fit`` loss averaged over
    ranks: the optimised loss, clean + adversarial for ConAdv), ``history``,
    ``seconds``, ``skipped_steps``.

    Raises:
        ValueError: when ``plan`` was made for another world size.
    """
    rank, size = hvd.rank(), hvd.size()
    if plan.world_size != size:
        raise ValueError(f"plan.world_size={plan.world_size} but Horovod runs {size} processes")
    keras.utils.set_random_seed(plan.seed)
    model = mnist1d_convnet(seed=plan.seed)
    schedule = plan.schedule
    inner = create_optimizer(
        plan.optimizer, learning_rate=schedule(0), **core_spelling.to_keras(plan.optimizer_args())
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
    shards = ShardedBatches(len(data.x_train), plan.global_batch, rank, size, plan.seed)
    evaluation = TestSetEvaluation(
        shard_of(data.x_test, rank, size), shard_of(data.y_test, rank, size), plan.epochs, hvd, on_epoch
    )
    started = time.perf_counter()
    model.fit(
        MNIST1DShard(data.x_train, data.y_train, shards),
        epochs=plan.epochs,
        verbose=0,
        callbacks=[BroadcastGlobalVariablesCallback(0), lr_callback, MetricAverageCallback(), evaluation],
    )
    last = evaluation.history[-1]
    skipped = getattr(inner, "skipped_steps", 0)
    return {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "train_loss": last["train_loss"],
        "history": evaluation.history,
        "seconds": time.perf_counter() - started,
        "skipped_steps": int(keras.ops.convert_to_numpy(skipped)),
        "framework_versions": {
            "tensorflow": tf.__version__, "keras": keras.__version__, "horovod": _horovod_version(),
            "numpy": np.__version__,
        },
    }


def _horovod_version() -> str:
    import horovod

    return horovod.__version__


class HorovodCellRunner:
    """The cell runner :mod:`hvd_largebatch.bench_worker` uses: threads, ``hvd.init()``, broadcast, :func:`train_cell`."""

    def __init__(self) -> None:
        configure_threads()
        import horovod.tensorflow as hvd

        hvd.init()
        self.hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()

    def broadcast_object(self, value: Any) -> Any:
        return self.hvd.broadcast_object(value, root_rank=0, name="hvd_largebatch_bench_job")

    def run_cell(
        self, plan: CellPlan, data: MNIST1D, on_epoch: Callable[[Mapping[str, Any]], None] | None
    ) -> dict[str, Any]:
        keras.backend.clear_session()  # each cell starts from a fresh graph state
        return train_cell(plan, data, self.hvd, on_epoch)
