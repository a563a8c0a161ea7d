"""Horovod elastic training for PyTorch: exact commit, restore and sync; an LR that follows the global batch.

:class:`ElasticState` is a ``horovod.common.elastic.State`` for
``horovod.torch.elastic.run``. Compared with Horovod's ``TorchState``:

* ``sync()`` uses :func:`~hvd_largebatch.torch_impl.distributed.broadcast_state`,
  which never runs an optimizer step (Horovod's ``broadcast_optimizer_state``
  runs a zero-gradient ``step()`` on an empty state, which with coupled weight
  decay shrinks the weights by ``lr * wd`` and seeds the momentum);
* the LR scheduler is committed and restored with the model and optimizer,
  and is an :class:`ElasticLRScheduler` evaluating a core
  :class:`~hvd_largebatch.schedules.ElasticSchedule` at the examples
  seen, so after a reset the LR is the recipe's for the new global batch;
* the position in the epoch is counted in examples, and
  :meth:`ElasticState.batches` hands each rank its part of the next global
  batch from that position (:mod:`hvd_largebatch.elastic_data`), so a change
  of world size loses and repeats no example of the epoch.

Example (``horovodrun -np 2 --min-np 1 --host-discovery-script ./hosts.sh python train.py``)::

    import horovod.torch as hvd
    from hvd_largebatch.schedules import ElasticSchedule
    from hvd_largebatch.torch_impl import LARS, DistributedOptimizer
    from hvd_largebatch.torch_impl.elastic import ElasticLRScheduler, ElasticState
    hvd.init()
    opt = DistributedOptimizer(LARS(model.named_parameters(), lr=0.1, weight_decay=5e-4))
    recipe = ElasticSchedule.from_epochs(0.1, 256, len(data), epochs=90, warmup_epochs=5,
                                         decay="step", milestones=(30, 60, 80))
    sched = ElasticLRScheduler(opt, recipe, per_worker_batch=64, world_size=hvd.size())
    state = ElasticState(model, opt, sched, dataset_size=len(data), commit_every=50)

    @hvd.elastic.run
    def train(state):
        while state.epoch < 90:
            for indices in state.batches():
                x, y = data[indices]
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sched.step()
                state.update_done()            # commits every 50 updates
            state.next_epoch()                 # commits

    train(state)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import horovod.torch as hvd
import numpy as np
import torch
from horovod.common.elastic import State
from torch.optim.lr_scheduler import LRScheduler

from hvd_largebatch.config import check_non_negative_int
from hvd_largebatch.elastic_data import MISSING_OPTIMIZER_ERROR, ElasticPosition
from hvd_largebatch.schedules import ElasticBatch, ElasticSchedule, check_elastic_schedule
from hvd_largebatch.torch_impl.distributed import broadcast_state

__all__ = ["ElasticLRScheduler", "ElasticState"]


class ElasticLRScheduler(LRScheduler):
    """Sets the LR of each update to ``schedule.lr(examples_seen, global_batch)`` for the current world size.

    ``step()`` (once per optimizer update, after ``optimizer.step()``) adds
    the global batch to ``examples_seen`` and sets the next update's LR.
    :meth:`set_world_size` re-derives the global batch after a reset and
    sets the LR the recipe gives at the same point of training for it.

    Exactly one of ``per_worker_batch`` (the global batch follows the world:
    ``per_worker_batch * world_size * backward_passes_per_step``, the LR
    follows the global batch) and ``global_batch`` (kept: the per-worker
    batch becomes ``global_batch / (world_size * backward_passes_per_step)``,
    the LR stays on the recipe) is given.

    Args:
        optimizer: the (possibly Horovod-wrapped) optimizer.
        schedule: the recipe, a :class:`~hvd_largebatch.schedules.ElasticSchedule`.
        per_worker_batch: examples per worker per backward pass, kept on a change.
        global_batch: examples per update over all workers, kept on a change.
        world_size: the number of workers now (``hvd.size()``).
        backward_passes_per_step: local gradient accumulation per update.
        examples_seen: the point of training to start from.

    Raises:
        ValueError: naming the argument; a non-``ElasticSchedule`` schedule
            names ``schedule`` (a step schedule cannot follow a change of
            global batch: convert it with ``ElasticSchedule.from_schedule``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: ElasticSchedule,
        *,
        per_worker_batch: int | None = None,
        global_batch: int | None = None,
        world_size: int,
        backward_passes_per_step: int = 1,
        examples_seen: int = 0,
    ) -> None:
        self.schedule = check_elastic_schedule(schedule)
        self.batch = ElasticBatch(per_worker_batch, global_batch, backward_passes_per_step)
        self.backward_passes_per_step = self.batch.backward_passes_per_step
        self.examples_seen = check_non_negative_int("examples_seen", examples_seen)
        self._started = False
        self._set_world(world_size)
        super().__init__(optimizer, last_epoch=-1)

    def _set_world(self, world_size: int) -> None:
        self.per_worker_batch, self.global_batch = self.batch.for_world(world_size)
        self.world_size = world_size

    def get_lr(self) -> list[float]:
        """The recipe's LR at ``examples_seen`` for the current global batch, for every param group."""
        return [float(self.schedule.lr(self.examples_seen, self.global_batch))] * len(self.optimizer.param_groups)

    def _apply(self) -> None:
        values = self.get_lr()
        for group, value in zip(self.optimizer.param_groups, values):
            group["lr"] = value
        self._last_lr = values

    def step(self, epoch: Any = None) -> None:
        """Advances by one update of the current global batch and sets the next update's LR."""
        if epoch is not None:
            raise ValueError(f"epoch must be None (the position is counted in examples), got {epoch!r}")
        self._step_count = getattr(self, "_step_count", 0) + 1
        if self._started:
            self.examples_seen += self.global_batch
            self.last_epoch += 1
        else:  # the call from LRScheduler.__init__
            self._started = True
            self.last_epoch = 0
        self._apply()

    def set_world_size(self, world_size: int) -> None:
        """Re-derives the global (or per-worker) batch for ``world_size`` workers and sets the LR for it."""
        self._set_world(world_size)
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The position (examples seen, updates), the batch policy and the recipe's config."""
        return {
            "examples_seen": self.examples_seen,
            "last_epoch": self.last_epoch,
            "world_size": self.world_size,
            "batch": dict(vars(self.batch)),
            "schedule": self.schedule.to_config(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s values and sets the LR they give."""
        self.schedule = ElasticSchedule.from_config(state_dict["schedule"])
        self.examples_seen = int(state_dict["examples_seen"])
        self.last_epoch = int(state_dict["last_epoch"])
        self.batch = ElasticBatch(**state_dict["batch"])
        self.backward_passes_per_step = self.batch.backward_passes_per_step
        self._set_world(int(state_dict["world_size"]))
        self._apply()


class ElasticState(ElasticPosition, State):
    """Model, optimizer, LR scheduler, position in the epoch and extras, committed and restored exactly.

    ``commit()`` copies everything to host memory (then checks for host
    changes, as Horovod's states do); ``restore()`` loads the last commit
    back, bit for bit; ``sync()`` gives every rank rank 0's weights,
    buffers and optimizer state with
    :func:`~hvd_largebatch.torch_impl.distributed.broadcast_state` (no
    optimizer step) and rank 0's scheduler, position and extras with one
    ``broadcast_object``; the reset hook sets the scheduler's world size to
    ``hvd.size()``, so the LR and the batch follow the new world.

    The position is ``epoch`` and ``examples_done`` (examples of the epoch
    trained on by all workers); :meth:`batches` yields this rank's indices
    of each next global batch, :meth:`update_done` advances by one global
    batch and commits every ``commit_every`` updates, :meth:`next_epoch`
    starts the next epoch and commits. Extra keyword arguments become
    attributes that are committed, restored and synced like the rest.

    Args:
        model: the module.
        optimizer: the (Horovod-wrapped) optimizer; required.
        scheduler: an :class:`ElasticLRScheduler` over ``optimizer``.
        dataset_size: examples in one epoch of the data set.
        commit_every: optimizer updates between commits (>= 1).
        seed: seed of every epoch's order (``seed + epoch``), the same on all ranks.
        shuffle: permute the data each epoch.
        **extras: other values to keep with the state (``epoch`` and
            ``examples_done`` may be given to start elsewhere than 0).

    Raises:
        ValueError: naming ``optimizer`` when it is None, ``commit_every``
            when it is not an integer >= 1, ``scheduler`` when it is not an
            :class:`ElasticLRScheduler` of ``optimizer``, or any other argument.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: ElasticLRScheduler,
        *,
        dataset_size: int,
        commit_every: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        **extras: Any,
    ) -> None:
        if optimizer is None:
            raise ValueError(MISSING_OPTIMIZER_ERROR)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(scheduler, ElasticLRScheduler):
            raise ValueError(
                f"scheduler must be an ElasticLRScheduler (the LR must follow the global batch), got "
                f"{type(scheduler).__name__}"
            )
        if scheduler.optimizer is not optimizer:
            raise ValueError("scheduler must schedule the optimizer given to the state, got another optimizer")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.init_position(dataset_size=dataset_size, commit_every=commit_every, seed=seed, shuffle=shuffle,
                           extras=extras)
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self._saved: dict[str, Any] = {}
        self.save()

    def world_batch(self) -> tuple[int, int]:
        """``(examples per worker per update, global batch)``: the scheduler's for the current world."""
        sched = self.scheduler
        return sched.per_worker_batch * sched.backward_passes_per_step, sched.global_batch

    # -- what is kept ---------------------------------------------------------
    def _plain(self) -> dict[str, Any]:
        return {**self.position(), "scheduler": self.scheduler.state_dict()}

    def _set_plain(self, plain: dict[str, Any]) -> None:
        plain = copy.deepcopy(plain)
        self.scheduler.load_state_dict(plain.pop("scheduler"))
        self.set_position(plain)

    def save(self) -> None:
        """Copies the model's and optimizer's state dicts, the scheduler, the position and the extras."""
        self._saved = {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "plain": copy.deepcopy(self._plain()),
        }

    def restore(self) -> None:
        """Loads the last commit back (weights, buffers, optimizer state, scheduler, position, extras)."""
        self.model.load_state_dict(self._saved["model"])
        self.optimizer.load_state_dict(copy.deepcopy(self._saved["optimizer"]))
        self._set_plain(self._saved["plain"])

    def sync(self) -> None:
        """Makes every rank's state rank 0's, exactly (no optimizer step), and commits it."""
        broadcast_state(self.model, self.optimizer, root_rank=0)
        self._set_plain(hvd.broadcast_object(self._plain(), root_rank=0, name="hvd_largebatch.elastic_state"))
        self.save()

    def reset(self) -> None:
        """After a reset (world changed): the scheduler's batch and LR follow ``hvd.size()``."""
        self.scheduler.set_world_size(hvd.size())

    # -- the loop ---------------------------------------------------------------
    def batches(self) -> Iterator[np.ndarray]:
        """This rank's example indices of each next global batch of the epoch, from the current position.

        Raises:
            RuntimeError: when a batch is requested again without :meth:`update_done` in between.
        """
        while True:
            remaining = self.update_indices(hvd.rank(), hvd.size())
            if not remaining:
                return
            position = (self.epoch, self.examples_done)
            yield remaining[0]
            if (self.epoch, self.examples_done) == position:
                raise RuntimeError("call state.update_done() after each update of state.batches()")
