"""What the PyTorch and Keras cell runners share, framework-free: Horovod set-up, the run's splits, its result.

Each framework's runner (``torch_runner.py``, ``keras_runner.py``) writes only
its training loop, ``train_cell(plan, data, hvd, on_epoch)``; this module
gives both the same protocol around it:

* :class:`HorovodRunner`: ``hvd.init()``, rank and size, rank 0's job
  broadcast, and ``run_cell`` calling the framework's ``train_cell``: what
  :func:`hvd_largebatch.bench.worker.load_runner` loads;
* :func:`start_run`: the world-size check and the run's
  :class:`~hvd_largebatch.bench.run_monitor.RunMonitor`;
* :func:`study_splits`: the training examples, and this rank's parts of the
  validation split (the last ``plan.study["validation_size"]`` training
  examples) and of the test set;
* :func:`framework_versions`: the versions a result records.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hvd_largebatch.bench.data import MNIST1D, shard_of
from hvd_largebatch.bench.recipes import CellPlan
from hvd_largebatch.bench.run_monitor import RunMonitor

__all__ = ["HorovodRunner", "TrainCell", "start_run", "study_splits", "framework_versions"]

#: ``train_cell(plan, data, hvd, on_epoch) -> result``: one framework's training of one run.
TrainCell = Callable[[CellPlan, MNIST1D, Any, Callable[[Mapping[str, Any]], None] | None], dict[str, Any]]


class HorovodRunner:
    """A cell runner over an initialised Horovod module (see :class:`hvd_largebatch.bench.worker.CellRunner`).

    Args:
        hvd: ``horovod.torch`` or ``horovod.tensorflow``; ``hvd.init()`` is called here.
        train_cell: the framework's training of one run.
        broadcast_name: the name of the job broadcast (TensorFlow op names take no dots).
    """

    def __init__(self, hvd: Any, train_cell: TrainCell, broadcast_name: str) -> None:
        hvd.init()
        self.hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self._train_cell = train_cell
        self._broadcast_name = broadcast_name

    def broadcast_object(self, value: Any) -> Any:
        return self.hvd.broadcast_object(value, root_rank=0, name=self._broadcast_name)

    def run_cell(
        self, plan: CellPlan, data: MNIST1D, on_epoch: Callable[[Mapping[str, Any]], None] | None
    ) -> dict[str, Any]:
        return self._train_cell(plan, data, self.hvd, on_epoch)


def start_run(plan: CellPlan, rank: int, size: int) -> RunMonitor:
    """The monitor of ``plan``'s run on this rank, after checking that the plan was made for ``size`` ranks.

    Raises:
        ValueError: when ``plan`` was made for another world size or is not a study run.
    """
    if plan.world_size != size:
        raise ValueError(f"plan.world_size={plan.world_size} but Horovod runs {size} processes")
    return RunMonitor(plan)


def study_splits(plan: CellPlan, data: MNIST1D, rank: int, size: int) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_val, y_val, x_test, y_test)`` of a study run on rank ``rank`` of ``size``.

    The training split is every training example but the last
    ``plan.study["validation_size"]``, the same on every rank; the validation
    split is those last examples and the test split MNIST-1D's test set, each
    cut into ``size`` disjoint parts (:func:`~hvd_largebatch.bench.data.shard_of`)
    of which this rank scores its own.
    """
    validation = plan.study["validation_size"]
    return (
        data.x_train[:-validation],
        data.y_train[:-validation],
        shard_of(data.x_train[-validation:], rank, size),
        shard_of(data.y_train[-validation:], rank, size),
        shard_of(data.x_test, rank, size),
        shard_of(data.y_test, rank, size),
    )


def framework_versions(**versions: str) -> dict[str, str]:
    """``versions`` (the framework's own) and those of Horovod and NumPy, as a result records them."""
    return {**versions, "horovod": importlib.metadata.version("horovod"), "numpy": np.__version__}
