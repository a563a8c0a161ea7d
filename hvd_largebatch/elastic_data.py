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

Example:
    >>> from hvd_largebatch.elastic_data import epoch_order, local_batch_indices
    >>> order = epoch_order(8, epoch=0, seed=1, shuffle=False)
    >>> [local_batch_indices(order, 4, per_worker_batch=2, rank=r, world_size=2).tolist() for r in (0, 1)]
    [[4, 5], [6, 7]]
    >>> local_batch_indices(order, 4, per_worker_batch=2, rank=0, world_size=1).tolist()
    [4, 5]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hvd_largebatch.config import check_bool, check_positive_int

__all__ = [
    "epoch_order",
    "local_batch_indices",
    "updates_left_in_epoch",
    "check_commit_every",
    "MISSING_OPTIMIZER_ERROR",
]


def _check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def epoch_order(dataset_size: int, epoch: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """The order of the data set's indices in ``epoch``: a permutation seeded by ``seed + epoch``, or ``arange``.

    Args:
        dataset_size: number of examples (>= 1).
        epoch: the epoch, from 0.
        seed: base seed, the same on every worker.
        shuffle: permute (True) or keep the data set order.

    Raises:
        ValueError: naming the argument.
    """
    dataset_size = check_positive_int("dataset_size", dataset_size)
    epoch = _check_non_negative_int("epoch", epoch)
    seed = _check_non_negative_int("seed", seed)
    check_bool("shuffle", shuffle)
    if not shuffle:
        return np.arange(dataset_size, dtype=np.int64)
    return np.random.default_rng(seed + epoch).permutation(dataset_size).astype(np.int64)


def updates_left_in_epoch(dataset_size: int, examples_done: int, global_batch: int) -> int:
    """Full global batches left in the epoch after ``examples_done`` examples.

    Raises:
        ValueError: naming the argument; naming ``examples_done`` when it exceeds ``dataset_size``.

    Example:
        >>> updates_left_in_epoch(64, 16, 16), updates_left_in_epoch(64, 16, 32), updates_left_in_epoch(64, 56, 16)
        (3, 1, 0)
    """
    dataset_size = check_positive_int("dataset_size", dataset_size)
    examples_done = _check_non_negative_int("examples_done", examples_done)
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
    examples_done = _check_non_negative_int("examples_done", examples_done)
    per_worker_batch = check_positive_int("per_worker_batch", per_worker_batch)
    world_size = check_positive_int("world_size", world_size)
    rank = _check_non_negative_int("rank", rank)
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
    if isinstance(commit_every, bool) or not isinstance(commit_every, (int, np.integer)) or int(commit_every) < 1:
        raise ValueError(
            f"commit_every must be an integer >= 1 (optimizer updates between commits), got {commit_every!r}"
        )
    return int(commit_every)
