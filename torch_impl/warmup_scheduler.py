"""``GradualWarmupScheduler``: a torch ``LRScheduler`` that evaluates a core ``Schedule`` in closed form."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from hvd_largebatch import config
from hvd_largebatch.schedules import Schedule

__all__ = ["GradualWarmupScheduler"]

#: Attributes that describe this process's warnings, not the schedule: never saved in ``state_dict()``.
_NOT_SAVED = ("optimizer", "_written_lrs", "_warned_external_change", "_warned_past_end")


def _group_scales(optimizer: torch.optim.Optimizer, last_epoch: int) -> list[float]:
    """Each group's LR over the first group's, read when the scheduler is built (see the class doc)."""
    key = "lr" if last_epoch == -1 else "initial_lr"
    lrs = [config.check_non_negative(f"param_groups[{i}]['{key}']", g.get(key, g["lr"]))
           for i, g in enumerate(optimizer.param_groups)]
    if lrs[0] == 0:
        if any(lrs):
            raise ValueError(
                f"param_groups[0]['lr'] is 0 but other groups' are not ({lrs}): GradualWarmupScheduler scales each "
                "group by its lr over the first group's; give the first group a non-zero lr"
            )
        return [1.0] * len(lrs)
    return [lr / lrs[0] for lr in lrs]


class GradualWarmupScheduler(LRScheduler):
    """Sets param group ``i``'s LR to ``schedule(t) * group_scales[i]`` at optimizer update ``t``, per iteration.

    The schedule (e.g. :func:`hvd_largebatch.schedules.goyal`: Goyal et al.'s
    gradual warmup from the base LR to the linearly scaled peak, then step
    decay) is a pure function of the step, so this scheduler never uses the
    recursive "multiply the current LR" form: after construction the LR is
    ``schedule(0)``; each ``step()`` (called once per optimizer update, after
    ``optimizer.step()``) advances ``t`` by one and sets ``schedule(t)``. The
    momentum correction that keeps the velocity consistent while the LR
    ramps is done by the optimizer (``momentum_correction=True``).

    Per-group LRs: the first param group follows the schedule; every other
    group keeps its ratio to the first, read from the LRs the groups hold
    when the scheduler is built: ``group_scales[i] = lr_i / lr_0`` (groups
    built with ``lr=0.5`` and ``lr=0.1`` run at ``schedule(t)`` and
    ``0.2 * schedule(t)``). Groups with equal LRs all follow the schedule.
    The scales are saved in ``state_dict()``.

    The scheduler owns the LR: if something else changed a group's LR since
    the scheduler last set it (another scheduler such as
    ``ReduceLROnPlateau``, or code writing ``param_groups[i]["lr"]``), the
    next ``step()`` overrides it with the schedule and warns once
    (``UserWarning``) naming the group and both values; express such
    decays in the ``Schedule`` instead. Stepping past the schedule's
    ``total_steps`` (more updates than planned, e.g. a ``DataLoader`` with
    ``drop_last=False`` giving one more batch per epoch than
    ``schedules.steps_per_epoch``) warns once too: from then on the LR stays
    at ``schedule(total_steps)``, which is 0 for poly/cosine/linear decays.

    ``state_dict()`` stores ``t``, the schedule's ``to_config()`` and the
    group scales, so a run restored from a checkpoint continues with exactly
    the same LRs. A step the optimizer skipped for a non-finite gradient
    still advances ``t``: the schedule follows iterations.

    Args:
        optimizer: the (possibly Horovod-wrapped) optimizer, with all its param groups.
        schedule: a :class:`hvd_largebatch.schedules.Schedule`.
        last_epoch: the last step taken, -1 for a fresh start (as torch's schedulers).

    Raises:
        ValueError: naming ``schedule`` when it is not a ``Schedule``; naming
            ``param_groups[0]['lr']`` when it is 0 while another group's is not.

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
        self.group_scales = _group_scales(optimizer, last_epoch)
        self._written_lrs: list[float] | None = None
        self._warned_external_change = False
        self._warned_past_end = False
        super().__init__(optimizer, last_epoch)

    def step(self, epoch: int | None = None) -> None:
        """Advances ``t`` and sets every group's LR; warns (once each) on a foreign LR change or past the end."""
        self._check_lrs_untouched()
        super().step(epoch)
        self._written_lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self.last_epoch > self.schedule.total_steps and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(
                f"GradualWarmupScheduler: optimizer update {self.last_epoch - 1} ran past the schedule's "
                f"total_steps={self.schedule.total_steps}; the LR stays at schedule(total_steps)="
                f"{self.schedule(self.schedule.total_steps):g} from now on. Build the schedule with the number of "
                "updates the loop really makes: steps_per_epoch=len(loader) (a DataLoader with drop_last=False "
                "has one more batch per epoch than schedules.steps_per_epoch(dataset_size, global_batch) when the "
                "batch does not divide the data), or use drop_last=True",
                UserWarning,
                stacklevel=2,
            )

    def _check_lrs_untouched(self) -> None:
        if self._written_lrs is None or self._warned_external_change:
            return
        for i, (group, written) in enumerate(zip(self.optimizer.param_groups, self._written_lrs)):
            if group["lr"] != written:
                self._warned_external_change = True
                warnings.warn(
                    f"GradualWarmupScheduler: param group {i}'s lr was changed from {written:g} (set by the "
                    f"scheduler) to {group['lr']:g} by something else (another LR scheduler such as "
                    "ReduceLROnPlateau, or code writing param_groups[i]['lr']); the scheduler owns the LR and sets "
                    "schedule(t) * group_scales[i] again now. Express the change in the Schedule (its decay) instead",
                    UserWarning,
                    stacklevel=3,
                )
                return

    def get_lr(self) -> list[float]:
        """``schedule(t) * group_scales[i]`` for param group ``i``, ``t = last_epoch`` (the current update's index).

        Raises:
            RuntimeError: when the optimizer gained param groups after the scheduler was built.
        """
        groups = len(self.optimizer.param_groups)
        if groups != len(self.group_scales):
            raise RuntimeError(
                f"the optimizer has {groups} param groups but GradualWarmupScheduler was built with "
                f"{len(self.group_scales)}: build the scheduler after adding every param group"
            )
        lr = float(self.schedule(max(self.last_epoch, 0)))
        return [lr * scale for scale in self.group_scales]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict[str, Any]:
        """torch's scheduler state (``t``, the group scales) with the schedule as its JSON-able config."""
        state = {key: value for key, value in self.__dict__.items() if key not in _NOT_SAVED}
        state["schedule"] = self.schedule.to_config()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores ``t``, the group scales and the schedule saved by :meth:`state_dict`.

        The optimizer's LRs come from the optimizer's own state dict; the
        check for foreign LR changes restarts at the next ``step()``.
        """
        state = {key: value for key, value in state_dict.items() if key not in _NOT_SAVED}
        if "schedule" in state and not isinstance(state["schedule"], Schedule):
            state["schedule"] = Schedule.from_config(state["schedule"])
        super().load_state_dict(state)
        self._written_lrs = None
