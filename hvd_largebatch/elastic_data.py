"""Which examples each worker trains on next, from a position in the epoch counted in examples, for any world size.

Elastic training commits its position as ``(epoch, examples_done)``, the
examples of the epoch that all workers together have already trained on.
The epoch's order is a fixed permutation of the data set (seeded by
``seed + epoch``, the same on every worker), and the update that starts at
``examples_done`` on ``world_size`` workers with ``per_worker_batch`` each
trains on the global batch ``order[examples_done : examples_done + B]``
(``B = per_worker_batch * world_size``), rank ``r`` on its ``r``-th slice
of ``per_worker_batch`` examples. The position does not depend on the world
size, so after a worker is lost or added the epoch continues with the
examples not yet seen, none lost and none repeated. An epoch ends when
fewer than ``B`` examples are left (those are dropped, as with
``drop_remainder=True``).

With a ``unit`` > 1 the permutation moves blocks of ``unit`` consecutive
examples (a data source that is read a batch of ``unit`` examples at a
time, such as a ``keras.utils.PyDataset``); positions and batches are then
multiples of ``unit``, so every rank's slice is made of whole blocks.

:class:`ElasticPosition` is the bookkeeping both frameworks' elastic states
share: the position, the extras committed with it, when to commit, and the
indices of this rank's remaining updates of the epoch.

Example:
    >>> from hvd_largebatch.elastic_data import epoch_order, local_batch_indices
    >>> order = epoch_order(8, epoch=0, seed=1, shuffle=False)
    >>> [local_batch_indices(order, 4, per_worker_batch=2, rank=r, world_size=2).tolist() for r in (0, 1)]
    [[4, 5], [6, 7]]
    >>> local_batch_indices(order, 4, per_worker_batch=2, rank=0, world_size=1).tolist()
    [4, 5]
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from hvd_largebatch.config import check_bool, check_int_in_range, check_non_negative_int, check_positive_int

__all__ = [
    "epoch_order",
    "local_batch_indices",
    "updates_left_in_epoch",
    "check_commit_every",
    "MISSING_OPTIMIZER_ERROR",
    "ElasticPosition",
]


def epoch_order(dataset_size: int, epoch: int, seed: int = 0, shuffle: bool = True, unit: int = 1) -> np.ndarray:
    """The order of the data set's indices in ``epoch``: blocks of ``unit`` examples permuted by ``seed + epoch``.

    Args:
        dataset_size: number of examples (>= 1), a multiple of ``unit``.
        epoch: the epoch, from 0.
        seed: base seed, the same on every worker.
        shuffle: permute (True) or keep the data set order.
        unit: examples that stay together (1: every example moves alone).

    Raises:
        ValueError: naming the argument; naming ``unit`` when it does not divide ``dataset_size``.

    Example:
        >>> epoch_order(6, epoch=0, seed=0, unit=2).reshape(3, 2)[:, 1] % 2  # blocks stay whole
        array([1, 1, 1])
    """
    dataset_size = check_positive_int("dataset_size", dataset_size)
    epoch = check_non_negative_int("epoch", epoch)
    seed = check_non_negative_int("seed", seed)
    check_bool("shuffle", shuffle)
    unit = check_positive_int("unit", unit)
    if dataset_size % unit:
        raise ValueError(f"unit={unit} does not divide dataset_size={dataset_size}; allowed: a divisor of it")
    if not shuffle:
        return np.arange(dataset_size, dtype=np.int64)
    blocks = np.random.default_rng(seed + epoch).permutation(dataset_size // unit).astype(np.int64)
    return (blocks[:, None] * unit + np.arange(unit, dtype=np.int64)).reshape(-1)


def updates_left_in_epoch(dataset_size: int, examples_done: int, global_batch: int) -> int:
    """Full global batches left in the epoch after ``examples_done`` examples.

    Raises:
        ValueError: naming the argument; naming ``examples_done`` when it exceeds ``dataset_size``.

    Example:
        >>> updates_left_in_epoch(64, 16, 16), updates_left_in_epoch(64, 16, 32), updates_left_in_epoch(64, 56, 16)
        (3, 1, 0)
    """
    dataset_size = check_positive_int("dataset_size", dataset_size)
    examples_done = check_non_negative_int("examples_done", examples_done)
    global_batch = check_positive_int("global_batch", global_batch)
    if examples_done > dataset_size:
        raise ValueError(f"examples_done={examples_done} exceeds dataset_size={dataset_size}; allowed: 0..{dataset_size}")
    return (dataset_size - examples_done) // global_batch


def local_batch_indices(
    order: np.ndarray, examples_done: int, per_worker_batch: int, rank: int, world_size: int
) -> np.ndarray:
    """Rank ``rank``'s examples for the update that starts ``examples_done`` examples into the epoch.

    ``order[examples_done + rank * b : examples_done + (rank + 1) * b]`` with
    ``b = per_worker_batch``: the ranks' slices make up the global batch
    ``order[examples_done : examples_done + b * world_size]``.

    Args:
        order: the epoch's order from :func:`epoch_order`.
        examples_done: examples of the epoch already trained on, by all workers.
        per_worker_batch: examples per worker in this update.
        rank: this worker's rank, ``0 <= rank < world_size``.
        world_size: the number of workers now.

    Raises:
        ValueError: naming the argument; naming ``examples_done`` when fewer
            than a global batch are left (the epoch is over).
    """
    examples_done = check_non_negative_int("examples_done", examples_done)
    per_worker_batch = check_positive_int("per_worker_batch", per_worker_batch)
    world_size = check_positive_int("world_size", world_size)
    rank = check_non_negative_int("rank", rank)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, {world_size}) for world_size={world_size}, got {rank}")
    global_batch = per_worker_batch * world_size
    if examples_done + global_batch > len(order):
        raise ValueError(
            f"examples_done={examples_done} leaves {len(order) - examples_done} examples of the epoch, fewer than "
            f"a global batch of {global_batch}: the epoch is over (start the next one at examples_done=0)"
        )
    start = examples_done + rank * per_worker_batch
    return np.asarray(order[start:start + per_worker_batch])


#: The error both frameworks raise for an elastic state built without an optimizer.
MISSING_OPTIMIZER_ERROR = (
    "optimizer is required for an elastic state, got None: a restore without the optimizer's state "
    "(velocities, moments, prev_lr, step counts) would not continue the committed run"
)


def check_commit_every(commit_every: Any) -> int:
    """Validates the commit interval of elastic training (updates between commits).

    Raises:
        ValueError: naming ``commit_every`` unless it is an integer >= 1.

    Example:
        >>> check_commit_every(10)
        10
    """
    return check_int_in_range("commit_every", commit_every, 1, meaning="optimizer updates between commits")


class ElasticPosition:
    """The position in training that both frameworks' elastic states commit, and when they commit it.

    A mixin for a Horovod elastic ``State`` (which provides ``commit()``);
    the framework state provides :meth:`world_batch` for the current world.
    The position is ``epoch``, ``examples_done`` (examples of the epoch
    trained on by all workers) and ``updates``; extra keyword arguments
    become attributes committed with it.
    """

    def world_batch(self) -> tuple[int, int]:
        """``(examples per worker per update, global batch)`` of the current world (the framework state's)."""
        raise NotImplementedError(f"{type(self).__name__} must define world_batch()")

    def init_position(
        self, *, dataset_size: Any, commit_every: Any, seed: Any, shuffle: Any, extras: dict[str, Any]
    ) -> None:
        """Validates and sets the data set, commit interval, order and start position (``epoch``, ``examples_done``).

        Raises:
            ValueError: naming ``commit_every`` unless it is an integer >= 1, or the other argument.
        """
        self.commit_every = check_commit_every(commit_every)
        self.dataset_size = check_positive_int("dataset_size", dataset_size)
        self.seed = check_non_negative_int("seed", seed)
        self.shuffle = check_bool("shuffle", shuffle)
        self.epoch = check_non_negative_int("epoch", extras.pop("epoch", 0))
        self.examples_done = check_non_negative_int("examples_done", extras.pop("examples_done", 0))
        self.updates = 0
        self._extra_names = tuple(extras)
        for name, value in extras.items():
            setattr(self, name, value)

    def position(self) -> dict[str, Any]:
        """The position and the extras, as plain values (broadcast and deep-copied by the states)."""
        plain = {"epoch": self.epoch, "examples_done": self.examples_done, "updates": self.updates}
        plain.update({name: getattr(self, name) for name in self._extra_names})
        return plain

    def set_position(self, plain: dict[str, Any]) -> None:
        """Sets every value of :meth:`position` (a deep copy of it)."""
        for name, value in copy.deepcopy(plain).items():
            setattr(self, name, value)

    def examples_per_update(self) -> int:
        """Examples one worker trains on per update: ``per_worker_batch * backward_passes_per_step``."""
        return self.world_batch()[0]

    def update_indices(self, rank: int, world_size: int, unit: int = 1) -> list[np.ndarray]:
        """This rank's example indices of every remaining update of the epoch, from the current position."""
        per_worker, global_batch = self.world_batch()
        order = epoch_order(self.dataset_size, self.epoch, self.seed, self.shuffle, unit)
        left = updates_left_in_epoch(self.dataset_size, self.examples_done, global_batch)
        return [
            local_batch_indices(order, self.examples_done + u * global_batch, per_worker, rank, world_size)
            for u in range(left)
        ]

    def update_done(self) -> None:
        """Advances by one global batch; commits every ``commit_every`` updates."""
        self.examples_done += self.world_batch()[1]
        self.updates += 1
        if self.updates % self.commit_every == 0:
            self.commit()  # type: ignore[attr-defined]  # horovod.common.elastic.State's

    def next_epoch(self) -> None:
        """Starts the next epoch at its first example, and commits."""
        self.epoch += 1
        self.examples_done = 0
        self.commit()  # type: ignore[attr-defined]
