"""``GradualWarmupScheduler``: a torch ``LRScheduler`` that evaluates a core ``Schedule`` in closed form."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from hvd_largebatch import config
from hvd_largebatch.schedules import Schedule

__all__ = ["GradualWarmupScheduler"]


class GradualWarmupScheduler(LRScheduler):
    """Sets every param group's LR to ``schedule(t)`` at optimizer update ``t``, per iteration.

    The schedule (e.g. :func:`hvd_largebatch.schedules.goyal`: Goyal et al.'s
    gradual warmup from the base LR to the linearly scaled peak, then step
    decay) is a pure function of the step, so this scheduler never uses the
    recursive "multiply the current LR" form: after construction the LR is
    ``schedule(0)``; each ``step()`` (called once per optimizer update, after
    ``optimizer.step()``) advances ``t`` by one and sets ``schedule(t)``. The
    momentum correction that keeps the velocity consistent while the LR
    ramps is done by the optimizer (``momentum_correction=True``).

    ``state_dict()`` stores ``t`` and the schedule's ``to_config()``, so a
    run restored from a checkpoint continues with exactly the same LRs.
    Every param group gets the same LR. A step the optimizer skipped for a
    non-finite gradient still advances ``t``: the schedule follows
    iterations.

    Args:
        optimizer: the (possibly Horovod-wrapped) optimizer.
        schedule: a :class:`hvd_largebatch.schedules.Schedule`.
        last_epoch: the last step taken, -1 for a fresh start (as torch's schedulers).

    Raises:
        ValueError: naming ``schedule`` when it is not a ``Schedule``.

    Example:
        >>> import torch
        >>> from hvd_largebatch import schedules
        >>> from hvd_largebatch.torch_impl import LARS, GradualWarmupScheduler
        >>> opt = LARS(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        >>> sched = GradualWarmupScheduler(opt, schedules.goyal(0.1, 256, 1024, steps_per_epoch=10, epochs=90))
        >>> lrs = []
        >>> for _ in range(3):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
        ...     opt.step(); sched.step()
        >>> lrs
        [0.1, 0.106, 0.112]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(
                f"schedule must be a hvd_largebatch.schedules.Schedule (e.g. schedules.goyal(...)), "
                f"got {type(schedule).__name__}"
            )
        last_epoch = config.check_int_in_range("last_epoch", last_epoch, -1)
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """``schedule(t)`` for every param group, ``t = last_epoch`` (the current update's index)."""
        return [float(self.schedule(max(self.last_epoch, 0)))] * len(self.optimizer.param_groups)

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict[str, Any]:
        """torch's scheduler state with the schedule as its JSON-able config."""
        state = super().state_dict()
        state["schedule"] = self.schedule.to_config()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores ``t`` and the schedule saved by :meth:`state_dict`."""
        state = dict(state_dict)
        if "schedule" in state and not isinstance(state["schedule"], Schedule):
            state["schedule"] = Schedule.from_config(state["schedule"])
        super().load_state_dict(state)
