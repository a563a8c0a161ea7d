"""Batch-size arithmetic of data-parallel training: global batch, per-worker batch, steps per epoch.

World size and backward passes per step are always arguments (never asked of
Horovod), so these are pure functions that the schedules and the bench share.
"""

from __future__ import annotations

import math
from typing import Union

from hvd_largebatch.config import check_bool, check_non_negative, check_positive_int

__all__ = ["global_batch_size", "per_worker_batch_size", "steps_per_epoch", "epochs_to_steps"]

Number = Union[int, float]


def global_batch_size(per_worker_batch: int, world_size: int, backward_passes_per_step: int = 1) -> int:
    """The global batch over which Horovod averages one update's gradients.

    ``global_batch = per_worker_batch * world_size * backward_passes_per_step``
    (``backward_passes_per_step`` is Horovod's local gradient accumulation).

    Args:
        per_worker_batch: examples per worker per backward pass.
        world_size: number of Horovod processes (``hvd.size()``, passed in).
        backward_passes_per_step: backward passes accumulated per update.

    Raises:
        ValueError: naming the argument, unless each is an integer >= 1.

    Example:
        >>> global_batch_size(256, 32)
        8192
        >>> global_batch_size(128, 32, backward_passes_per_step=2)
        8192
    """
    per_worker_batch = check_positive_int("per_worker_batch", per_worker_batch)
    world_size = check_positive_int("world_size", world_size)
    backward_passes_per_step = check_positive_int("backward_passes_per_step", backward_passes_per_step)
    return per_worker_batch * world_size * backward_passes_per_step


def per_worker_batch_size(global_batch: int, world_size: int, backward_passes_per_step: int = 1) -> int:
    """The per-worker batch that makes up ``global_batch``; checks divisibility.

    Args:
        global_batch: the global batch of one update.
        world_size: number of Horovod processes (passed in, never queried).
        backward_passes_per_step: backward passes accumulated per update.

    Returns:
        ``global_batch // (world_size * backward_passes_per_step)``.

    Raises:
        ValueError: naming ``global_batch`` when it is not a multiple of
            ``world_size * backward_passes_per_step`` (every worker must see
            the same number of examples for the allreduce average to be the
            global-batch mean), or naming any argument that is not an integer >= 1.

    Example:
        >>> per_worker_batch_size(8192, 32)
        256
    """
    global_batch = check_positive_int("global_batch", global_batch)
    world_size = check_positive_int("world_size", world_size)
    backward_passes_per_step = check_positive_int("backward_passes_per_step", backward_passes_per_step)
    parts = world_size * backward_passes_per_step
    if global_batch % parts:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by world_size={world_size} x "
            f"backward_passes_per_step={backward_passes_per_step}; allowed: a multiple of {parts}"
        )
    return global_batch // parts


def steps_per_epoch(dataset_size: int, global_batch: int, drop_remainder: bool = True) -> int:
    """Optimizer updates per pass over the data.

    Args:
        dataset_size: number of training examples.
        global_batch: examples per update (all workers).
        drop_remainder: drop the last partial batch (``floor``) or keep it (``ceil``).

    Raises:
        ValueError: naming the argument; also naming ``dataset_size`` when it
            is smaller than ``global_batch`` with ``drop_remainder=True`` (an
            epoch would have no update).

    Example:
        >>> steps_per_epoch(1281167, 8192), steps_per_epoch(1281167, 8192, drop_remainder=False)
        (156, 157)
    """
    dataset_size = check_positive_int("dataset_size", dataset_size)
    global_batch = check_positive_int("global_batch", global_batch)
    check_bool("drop_remainder", drop_remainder)
    steps = dataset_size // global_batch if drop_remainder else -(-dataset_size // global_batch)
    if steps < 1:
        raise ValueError(
            f"dataset_size={dataset_size} is smaller than global_batch={global_batch} with "
            "drop_remainder=True: an epoch would have no step; allowed: dataset_size >= global_batch"
        )
    return steps


def epochs_to_steps(epochs: Number, steps_per_epoch: int, argument: str = "epochs") -> int:
    """``epochs * steps_per_epoch`` rounded to the nearest step (halves round up).

    Args:
        epochs: a number of epochs >= 0; fractions are allowed (0.5 epoch of warmup).
        steps_per_epoch: updates per epoch, an integer >= 1.
        argument: the name used in error messages.

    Raises:
        ValueError: naming ``argument`` or ``steps_per_epoch``.

    Example:
        >>> epochs_to_steps(5, 156), epochs_to_steps(0.5, 155)
        (780, 78)
    """
    epochs = check_non_negative(argument, epochs)
    steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
    return int(math.floor(epochs * steps_per_epoch + 0.5))
