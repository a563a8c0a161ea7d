"""Horovod elastic training for Keras 3 under ``model.fit``: exact commit, restore and sync; LR follows the batch.

Horovod's ``horovod.tensorflow.keras.elastic`` does not work on Keras 3
(``KerasState`` calls ``optimizer.variables()``, a list in Keras 3), and
Horovod's ``horovod.tensorflow.elastic.run`` recognises the survivor's
"Horovod has been shut down" error only from the HorovodAllreduce,
HorovodAllgather and HorovodBroadcast ops: from the package's
``DistributedOptimizer`` it comes from ``HorovodGroupedAllreduce_...``, and
``run`` returns silently with the training unfinished. This module uses
``horovod.tensorflow`` ops only:

* :class:`ElasticState` commits and restores ``model.variables`` and the
  optimizer's variables (the DistributedOptimizer's gradient accumulators
  and pass count, the wrapped optimizer's slots, iteration count, LR,
  ``prev_learning_rate``),
  the position (epoch, examples done in it, examples seen, updates) and any
  extras; ``sync()`` broadcasts rank 0's variables and plain state (nothing
  is stepped); after a reset the global batch, and with it the LR of the
  core :class:`~hvd_largebatch.schedules.ElasticSchedule`, follow
  ``hvd.size()``;
* :meth:`ElasticState.fit` runs ``model.fit`` from the committed position:
  each rank fits on its part of the remaining global batches of the epoch
  (:mod:`hvd_largebatch.elastic_data`), read from arrays, a
  ``tf.data.Dataset`` or a ``keras.utils.PyDataset``
  (:mod:`hvd_largebatch.tf.elastic_inputs`), with :class:`ElasticCallback`,
  which sets the LR before each batch, advances the position after each
  update and commits every ``commit_every`` updates;
* with ``DistributedOptimizer(..., backward_passes_per_step=k)`` an update
  is ``k`` batches: the position advances, and a commit happens, only after
  the ``k``-th, when the accumulators are zero (a commit between two
  micro-batches raises); a worker lost in the middle of an update takes its
  partial sums with it, and the survivors restore the last commit and redo
  the whole update;
* :func:`run` is ``hvd.elastic.run`` for this state: any TensorFlow error
  raised by a Horovod op (grouped allreduce included) becomes a reset.

Example (``horovodrun -np 2 --min-np 1 --host-discovery-script ./hosts.sh python train.py``)::

    import horovod.tensorflow as hvd
    from hvd_largebatch.schedules import ElasticSchedule
    from hvd_largebatch.tf import LARS, DistributedOptimizer, elastic
    hvd.init()
    model.compile(optimizer=DistributedOptimizer(LARS(learning_rate=0.1, weight_decay=5e-4)),
                  loss="sparse_categorical_crossentropy", jit_compile=False)
    recipe = ElasticSchedule.from_epochs(0.1, 256, len(x), epochs=90, warmup_epochs=5,
                                         decay="step", milestones=(30, 60, 80))
    state = elastic.ElasticState(model, recipe, per_worker_batch=64, dataset_size=len(x), commit_every=50)

    @elastic.run
    def train(state):
        state.fit(x, y, epochs=90, verbose=0)

    train(state)
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from typing import Any

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf
from horovod.common.elastic import State, run_fn
from horovod.common.exceptions import HorovodInternalError

from hvd_largebatch.config import check_non_negative_int, check_positive_int
from hvd_largebatch.elastic_data import MISSING_OPTIMIZER_ERROR, ElasticPosition
from hvd_largebatch.schedules import ElasticBatch, ElasticSchedule, check_elastic_schedule
from hvd_largebatch.tf.distributed import find_distributed_optimizer
from hvd_largebatch.tf.elastic_inputs import input_unit, rank_input

__all__ = ["ElasticState", "ElasticCallback", "run", "is_horovod_error"]

#: TensorFlow error types by which Horovod's ops report a lost or shut-down peer.
_HOROVOD_ERROR_TYPES = (tf.errors.UnknownError, tf.errors.AbortedError, tf.errors.UnavailableError,
                        tf.errors.InternalError, tf.errors.FailedPreconditionError)


#: A Horovod op's node name, or the message of a Horovod that a lost peer shut down.
_HOROVOD_ERROR_TEXT = re.compile(
    r"Horovod(Grouped)?(Allreduce|Allgather|Broadcast|Alltoall|Reducescatter|Join|Barrier)|Horovod has been shut down"
)


def is_horovod_error(error: BaseException) -> bool:
    """True for a TensorFlow op error raised by any Horovod op (``HorovodAllreduce``, ``HorovodGroupedAllreduce_...``)."""
    if not isinstance(error, _HOROVOD_ERROR_TYPES):
        return False
    text = f"{getattr(error, 'message', '')} {getattr(error, 'node_def', '')} {error}"
    return _HOROVOD_ERROR_TEXT.search(text) is not None


def _reset() -> None:
    hvd.shutdown()
    hvd.init()


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """``hvd.elastic.run`` for Keras: retries ``func(state, ...)`` after every reset, until it returns.

    Like Horovod's: on a lost worker the state is restored to its last
    commit, Horovod re-initialises on the new set of workers, ``state.sync()``
    gives everyone rank 0's state, and ``func`` is called again; a host
    change noticed at a commit resets the same way (without restoring). Unlike
    ``horovod.tensorflow.elastic.run``, a TensorFlow error from *any* Horovod
    op becomes a reset (the package's DistributedOptimizer uses a grouped
    allreduce); any other error propagates: nothing returns silently.
    """

    @functools.wraps(func)
    def translated(state: State, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(state, *args, **kwargs)
        except tf.errors.OpError as error:
            if is_horovod_error(error):
                raise HorovodInternalError(error) from error
            raise

    return run_fn(translated, _reset)


def _value(variable: Any) -> Any:
    return variable.value if isinstance(variable, keras.Variable) else variable


class ElasticState(ElasticPosition, State):
    """Model and optimizer variables, position and extras of a Keras run, committed and restored exactly.

    Args:
        model: a compiled ``keras.Model`` (its optimizer is part of the state).
        schedule: the LR recipe, an :class:`~hvd_largebatch.schedules.ElasticSchedule`.
        per_worker_batch: examples per worker per batch, kept on a change
            (the global batch and the LR follow the world size); or
        global_batch: examples per update, kept on a change (the per-worker
            batch follows it; the LR stays on the recipe).
        dataset_size: examples in one epoch.
        commit_every: updates between commits (>= 1).
        seed: seed of every epoch's order (``seed + epoch``).
        shuffle: permute the data each epoch.
        optimizer: defaults to ``model.optimizer``; required.
        **extras: other values committed, restored and synced with the state.

    The global batch is ``per_worker_batch * world_size * k`` with ``k`` the
    DistributedOptimizer's ``backward_passes_per_step``.

    Raises:
        ValueError: naming ``optimizer`` when the model has none, ``commit_every``
            when it is not an integer >= 1, ``schedule`` when it is not an
            ``ElasticSchedule``, or any other argument.
    """

    def __init__(
        self,
        model: keras.Model,
        schedule: ElasticSchedule,
        *,
        per_worker_batch: int | None = None,
        global_batch: int | None = None,
        dataset_size: int,
        commit_every: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        optimizer: keras.optimizers.Optimizer | None = None,
        **extras: Any,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
        optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError(MISSING_OPTIMIZER_ERROR)
        self.schedule = check_elastic_schedule(schedule)
        self.distributed = find_distributed_optimizer(optimizer)
        passes = 1 if self.distributed is None else self.distributed.backward_passes_per_step
        self.batch = ElasticBatch(per_worker_batch, global_batch, passes)
        self.backward_passes_per_step = passes
        self.model, self.optimizer = model, optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        self.examples_seen = check_non_negative_int("examples_seen", extras.pop("examples_seen", 0))
        self.init_position(dataset_size=dataset_size, commit_every=commit_every, seed=seed, shuffle=shuffle,
                           extras=extras)
        self.fit_indices = np.zeros(0, dtype=np.int64)
        self._set_world(hvd.size())
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self._saved: dict[str, Any] = {}
        self.save()

    # -- batch and LR for the world --------------------------------------------
    def _set_world(self, world_size: int) -> None:
        self.world_size = world_size
        self.per_worker_batch, self.global_batch = self.batch.for_world(world_size)

    def world_batch(self) -> tuple[int, int]:
        """``(examples per worker per update, global batch)`` of the current world."""
        return self.per_worker_batch * self.backward_passes_per_step, self.global_batch

    @property
    def learning_rate(self) -> float:
        """The recipe's LR for the next update: ``schedule.lr(examples_seen, global_batch)``."""
        return float(self.schedule.lr(self.examples_seen, self.global_batch))

    # -- what is kept ------------------------------------------------------------
    def variables(self) -> list[Any]:
        """``model.variables`` followed by the optimizer's variables (the DistributedOptimizer's included)."""
        return list(self.model.variables) + list(self.optimizer.variables)

    def _plain(self) -> dict[str, Any]:
        return {**self.position(), "examples_seen": self.examples_seen}

    def _passes_into_update(self) -> int:
        if self.backward_passes_per_step == 1:
            return 0
        return int(keras.ops.convert_to_numpy(self.distributed.local_passes)) % self.backward_passes_per_step

    def save(self) -> None:
        """Copies every variable's value and the plain state to host memory.

        Raises:
            RuntimeError: when called between two micro-batches of an update
                (gradients accumulated, no update yet): commit after updates only.
        """
        passes = self._passes_into_update()
        if passes:
            raise RuntimeError(
                f"commit between micro-batches: {passes} of backward_passes_per_step="
                f"{self.backward_passes_per_step} passes are accumulated; commit only after an update"
            )
        self._saved = {
            "variables": [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in self.variables()],
            "plain": copy.deepcopy(self._plain()),
        }

    def restore(self) -> None:
        """Assigns the last commit back to every variable, and the plain state."""
        for variable, value in zip(self.variables(), self._saved["variables"]):
            variable.assign(value)
        self.set_position(self._saved["plain"])

    def sync(self) -> None:
        """Every rank gets rank 0's variables (one broadcast each, no step) and plain state, then commits."""
        if hvd.size() > 1:
            hvd.broadcast_variables([_value(v) for v in self.variables()], root_rank=0)
        self.set_position(hvd.broadcast_object(self._plain(), root_rank=0, name="hvd_largebatch.elastic_state"))
        self.optimizer.learning_rate = self.learning_rate
        self.save()

    def reset(self) -> None:
        """After a reset: the batch follows ``hvd.size()``, the LR the recipe, and ``fit`` retraces its step."""
        self._set_world(hvd.size())
        self.optimizer.learning_rate = self.learning_rate
        self.model.train_function = None  # the next fit traces a step for the new set of workers

    # -- training ------------------------------------------------------------------
    def local_indices(self, unit: int = 1) -> np.ndarray:
        """This rank's example indices of every remaining global batch of the epoch, in order."""
        parts = self.update_indices(hvd.rank(), hvd.size(), unit)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def fit(
        self, x: Any, y: Any = None, *, epochs: int, callbacks: list[Any] | None = None, **fit_kwargs: Any
    ) -> None:
        """Fits epoch by epoch from the committed position until ``epochs`` epochs are done.

        Each rank fits on its examples of the remaining global batches
        (``fit_indices``, in order), ``per_worker_batch`` per batch, from
        arrays ``x``, ``y`` (indexable by an index array), a
        ``tf.data.Dataset`` of single examples or a ``keras.utils.PyDataset``
        (see :mod:`hvd_largebatch.tf.elastic_inputs`), with
        :class:`ElasticCallback` after ``callbacks``.

        Raises:
            ValueError: naming ``fit_kwargs`` that the state decides itself
                (``batch_size``, ``epochs``, ``shuffle``, ``initial_epoch``,
                ``steps_per_epoch``), or ``x``/``y``/``per_worker_batch``
                when the data cannot be read by example.
        """
        epochs = check_positive_int("epochs", epochs)
        decided = sorted(set(fit_kwargs) & {"batch_size", "shuffle", "initial_epoch", "steps_per_epoch"})
        if decided:
            raise ValueError(f"fit_kwargs must not set {', '.join(decided)}: the elastic state decides them")
        unit = input_unit(x, y, self.dataset_size, self.shuffle)
        while self.epoch < epochs:
            self.fit_indices = self.local_indices(unit)
            if len(self.fit_indices):
                data = rank_input(
                    x, y, self.fit_indices, batch=self.per_worker_batch, unit=unit,
                    per_update=self.examples_per_update(), examples_done=self.examples_done,
                    global_batch=self.global_batch, rank=hvd.rank(),
                )
                self.model.fit(**data, epochs=1, shuffle=False,
                               callbacks=[*(callbacks or []), ElasticCallback(self)], **fit_kwargs)
            self.next_epoch()

    def update_done(self) -> None:
        """Advances by one global batch (examples seen too); commits every ``commit_every`` updates."""
        self.examples_seen += self.global_batch
        super().update_done()


class ElasticCallback(keras.callbacks.Callback):
    """Sets the recipe's LR before each batch; after each update advances the state's position (committing every N).

    The package's SGD, LARS and CLARS correct their velocity for the LR
    change themselves (momentum correction from their recorded previous LR).

    Args:
        state: the :class:`ElasticState` of this run.
    """

    def __init__(self, state: ElasticState):
        super().__init__()
        if not isinstance(state, ElasticState):
            raise ValueError(f"state must be an ElasticState, got {type(state).__name__}")
        self.state = state

    def on_train_begin(self, logs=None):
        if getattr(self.model, "steps_per_execution", 1) != 1:
            raise ValueError("ElasticCallback commits between batches; compile with steps_per_execution=1")

    def on_train_batch_begin(self, batch, logs=None):
        self.state.optimizer.learning_rate = self.state.learning_rate

    def on_train_batch_end(self, batch, logs=None):
        # each fit starts at an update's first micro-batch; the update is done after its last
        if (batch + 1) % self.state.backward_passes_per_step == 0:
            self.state.update_done()
