"""Decay pieces: the LR for ``t >= W``, as pure functions of the step (ALGORITHMS.md, "Schedules").

Each kind is one entry of :data:`DECAYS` (its value, its description and the
fields it reads), so adding a decay kind means writing its piece and adding
one entry here; :class:`~hvd_largebatch.schedules.Schedule`, ``make_schedule``
and the CLI read the table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union

from hvd_largebatch.config import check_positive, is_integer

if TYPE_CHECKING:
    from hvd_largebatch.schedules.record import Schedule

__all__ = [
    "DECAY_KINDS",
    "MILESTONE_UNITS",
    "DecayKind",
    "DECAYS",
    "decay_progress",
    "step_decay",
    "poly_decay",
    "cosine_decay",
    "linear_decay",
    "validated_milestones",
]

Number = Union[int, float]

#: Units of step-decay milestones: epochs (compared with ``t / steps_per_epoch``) or steps.
MILESTONE_UNITS = ("epoch", "step")


def decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """``u / D`` with ``u = t - W`` and ``D = T - W``; 1 when ``D = 0`` (warmup over the whole run)."""
    span = total_steps - warmup_steps
    return (step - warmup_steps) / span if span else 1.0


def step_decay(position: float, peak: float, milestones: Iterable[Number], gamma: float) -> float:
    """``peak * gamma ** k`` with ``k`` the number of milestones ``<= position``.

    Example:
        >>> step_decay(65, 3.2, (30, 60, 80), 0.1) == 3.2 * 0.1**2
        True
    """
    return peak * gamma ** sum(1 for milestone in milestones if milestone <= position)


def poly_decay(progress: float, peak: float, end_lr: float, power: float) -> float:
    """``end_lr + (peak - end_lr) * (1 - progress) ** power`` (LARS paper: ``power = 2``)."""
    return end_lr + (peak - end_lr) * (1.0 - progress) ** power


def linear_decay(progress: float, peak: float, end_lr: float) -> float:
    """:func:`poly_decay` with ``power = 1``."""
    return poly_decay(progress, peak, end_lr, 1.0)


def cosine_decay(progress: float, peak: float, end_lr: float) -> float:
    """``end_lr + (peak - end_lr) * (1 + cos(pi * progress)) / 2``."""
    return end_lr + (peak - end_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _progress(s: Schedule, t: int) -> float:
    return decay_progress(t, s.warmup_steps, s.total_steps)


def _step_value(s: Schedule, t: int) -> float:
    position = t / s.steps_per_epoch if s.milestone_unit == "epoch" else t
    return step_decay(position, s.peak, s.milestones, s.gamma)


def _step_text(s: Schedule) -> str:
    unit = "epochs" if s.milestone_unit == "epoch" else "steps"
    return f"step decay x{s.gamma:g} at {unit} {', '.join(f'{m:g}' for m in s.milestones)}"


@dataclasses.dataclass(frozen=True)
class DecayKind:
    """One decay kind, read by :class:`~hvd_largebatch.schedules.Schedule`.

    Attributes:
        value: ``(schedule, t) -> lr`` for ``W <= t <= T``.
        describe: ``schedule -> text`` for ``Schedule.describe``.
        ends_at_end_lr: the decay ends at ``end_lr``, which must then be ``<= peak``.
        uses_milestones: the decay reads ``milestones`` (others refuse them).
    """

    value: Callable[[Schedule, int], float]
    describe: Callable[[Schedule], str]
    ends_at_end_lr: bool = False
    uses_milestones: bool = False


#: Every decay kind applied after the warmup.
DECAYS: dict[str, DecayKind] = {
    "step": DecayKind(_step_value, _step_text, uses_milestones=True),
    "poly": DecayKind(
        lambda s, t: poly_decay(_progress(s, t), s.peak, s.end_lr, s.power),
        lambda s: f"poly decay (power {s.power:g}) to {s.end_lr:g}",
        ends_at_end_lr=True,
    ),
    "cosine": DecayKind(
        lambda s, t: cosine_decay(_progress(s, t), s.peak, s.end_lr),
        lambda s: f"cosine decay to {s.end_lr:g}",
        ends_at_end_lr=True,
    ),
    "linear": DecayKind(
        lambda s, t: linear_decay(_progress(s, t), s.peak, s.end_lr),
        lambda s: f"linear decay to {s.end_lr:g}",
        ends_at_end_lr=True,
    ),
    "constant": DecayKind(lambda s, t: s.peak, lambda s: "constant"),
}
#: Decay kinds applied after the warmup.
DECAY_KINDS = tuple(DECAYS)


def validated_milestones(
    raw: Any,
    *,
    decay: str,
    milestone_unit: str,
    steps_per_epoch: int | None,
    warmup_steps: int,
    total_steps: int,
) -> tuple[Number, ...]:
    """Checks and normalises step-decay milestones (integral epochs become ints).

    Raises:
        ValueError: naming ``milestones`` (or ``steps_per_epoch`` when epoch
            milestones have no epoch length): not a sequence, given to a decay
            that has none, empty for a decay that needs them, not increasing,
            or not strictly after the warmup and within training.
    """
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        raise ValueError(f"milestones must be a sequence of numbers, got {raw!r}")
    raw = tuple(raw)
    if not DECAYS[decay].uses_milestones:
        if raw:
            raise ValueError(f"milestones are only used by decay='step', got milestones={raw!r} with decay={decay!r}")
        return ()
    if not raw:
        raise ValueError(f"milestones must hold at least one milestone for decay={decay!r}, got ()")
    if milestone_unit == "epoch" and steps_per_epoch is None:
        raise ValueError("steps_per_epoch is required for milestones in epochs (milestone_unit='epoch'), got None")
    values: list[Number] = []
    for value in raw:
        if milestone_unit == "step":
            if not is_integer(value):
                raise ValueError(f"milestones must be integers with milestone_unit='step', got {value!r}")
            value = int(value)
        else:
            value = check_positive("milestones", value)
            value = int(value) if value.is_integer() else value
        values.append(value)
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"milestones must be strictly increasing, got {raw!r}")
    # The same comparisons as the step decay: a milestone must take effect after
    # the warmup (not at or before step W) and no later than step T.
    scale = steps_per_epoch if milestone_unit == "epoch" else 1
    warmup_end, end = warmup_steps / scale, total_steps / scale
    for value in values:
        if not warmup_end < value <= end:
            unit = "epoch" if scale != 1 else "step"
            raise ValueError(
                f"milestones must lie after the warmup and within training, i.e. in "
                f"({warmup_end:g}, {end:g}] ({unit}s); got {value!r}"
            )
    return tuple(values)
