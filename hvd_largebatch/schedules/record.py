"""``Schedule``: the immutable, serialisable join of a warmup piece and a decay piece."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Union

from hvd_largebatch.config import (
    check_choice,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)
from hvd_largebatch.schedules.decay import DECAYS, MILESTONE_UNITS, validated_milestones
from hvd_largebatch.schedules.warmup import WARMUPS

__all__ = ["Schedule", "checked_decay_factors", "config_of", "from_config_of"]


def checked_decay_factors(gamma: Any, power: Any, end_lr: Any) -> dict[str, float]:
    """Validates the decay factors of a schedule: ``gamma`` in (0, 1], ``power`` > 0, ``end_lr`` >= 0.

    Raises:
        ValueError: naming the argument.
    """
    gamma = check_positive("gamma", gamma)
    if gamma > 1:
        raise ValueError(f"gamma must be in (0, 1] (a decay factor), got {gamma!r}")
    return {"gamma": gamma, "power": check_positive("power", power), "end_lr": check_non_negative("end_lr", end_lr)}


def config_of(record: Any) -> dict[str, Any]:
    """A frozen schedule dataclass's fields as a JSON-able dict (``milestones`` as a list)."""
    values = dataclasses.asdict(record)
    values["milestones"] = list(record.milestones)
    return values


def from_config_of(cls: type, config: Any, required: tuple[str, ...] = ()) -> Any:
    """Rebuilds (and so re-validates) a frozen schedule dataclass from :func:`config_of`'s dict.

    Raises:
        ValueError: naming ``config`` when it is not a mapping, or naming
            unknown or missing keys, or any invalid field.
    """
    name = cls.__name__
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping from {name}.to_config(), got {config!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise ValueError(f"unknown {name} config key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{name} config is missing required key(s) {', '.join(missing)}")
    values = dict(config)
    if isinstance(values.get("milestones"), list):
        values["milestones"] = tuple(values["milestones"])
    return cls(**values)

Number = Union[int, float]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """An immutable, serialisable learning-rate schedule ``lr(step)``.

    Steps count optimizer updates from 0; ``W`` is ``warmup_steps``, ``T``
    ``total_steps``, ``S`` ``steps_per_epoch``. For ``t < W`` the warmup
    piece of :data:`~hvd_largebatch.schedules.warmup.WARMUPS`:

    * ``gradual`` (Goyal): ``lr(t) = start + (peak - start) * t / W``;
    * ``constant``: ``lr(t) = start``.

    For ``t >= W``, with ``u = t - W`` and ``D = T - W``, the decay piece of
    :data:`~hvd_largebatch.schedules.decay.DECAYS`:

    * ``step``: ``peak * gamma ** k`` with ``k`` the number of milestones
      ``<= t / S`` (epoch milestones) or ``<= t`` (step milestones); the
      milestones count from step 0, warmup included, as in Goyal et al.;
    * ``poly``: ``end_lr + (peak - end_lr) * (1 - u / D) ** power``
      (You, Gitman, Ginsburg 2017 use ``power = 2``);
    * ``cosine``: ``end_lr + (peak - end_lr) * (1 + cos(pi * u / D)) / 2``;
    * ``linear``: ``poly`` with ``power = 1`` (the ``power`` field is ignored);
    * ``constant``: ``peak``.

    For ``t >= T`` the LR stays at ``lr(T)``. When ``W == T`` (warmup over
    the whole run) ``D = 0`` and ``lr(T)`` is the decay's end value
    (``u / D`` is taken as 1).

    Build one with :func:`make_schedule`, :func:`goyal` or
    :func:`lars_poly`; constructing it directly validates every field too.
    Fields that a kind does not use (``gamma`` for a cosine decay, ...) keep
    their defaults and are ignored.

    Attributes:
        peak: LR at the end of the warmup, usually :func:`scale_lr`'s result.
        total_steps: ``T`` (>= 1).
        warmup: one of ``WARMUP_KINDS``.
        warmup_steps: ``W``, ``0 <= W <= T``; must be 0 for ``warmup="none"``.
        warmup_start: the warmup's ``start`` LR (``0 <= start <= peak`` when
            ``W > 0``: a warmup never lowers the LR); required for ``gradual``
            and ``constant``, None for ``none``.
        decay: one of ``DECAY_KINDS``.
        milestones: ``step`` decay only: increasing, each after the warmup
            and not after the end.
        milestone_unit: ``"epoch"`` (needs ``steps_per_epoch``) or ``"step"`` (integers).
        steps_per_epoch: ``S``, or None when nothing is expressed in epochs.
        gamma: ``step`` decay factor, in (0, 1].
        power: ``poly`` exponent, > 0.
        end_lr: final LR of ``poly``/``cosine``/``linear``, in [0, peak].

    Example:
        >>> s = Schedule(peak=1.0, total_steps=10, warmup="gradual", warmup_steps=4,
        ...              warmup_start=0.2, decay="cosine", end_lr=0.0)
        >>> [round(s(t), 4) for t in (0, 2, 4, 7, 10, 99)]
        [0.2, 0.6, 1.0, 0.5, 0.0, 0.0]
        >>> Schedule.from_config(s.to_config()) == s
        True
    """

    peak: float
    total_steps: int
    warmup: str = "none"
    warmup_steps: int = 0
    warmup_start: float | None = None
    decay: str = "constant"
    milestones: tuple[Number, ...] = ()
    milestone_unit: str = "epoch"
    steps_per_epoch: int | None = None
    gamma: float = 0.1
    power: float = 2.0
    end_lr: float = 0.0

    def __post_init__(self) -> None:
        def set_field(name: str, value: Any) -> None:  # the dataclass is frozen
            object.__setattr__(self, name, value)

        set_field("peak", check_non_negative("peak", self.peak))
        set_field("total_steps", check_positive_int("total_steps", self.total_steps))
        check_choice("warmup", self.warmup, WARMUPS)
        set_field("warmup_steps", check_non_negative_int("warmup_steps", self.warmup_steps))
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} is longer than training (total_steps={self.total_steps}); "
                "allowed: 0 <= warmup_steps <= total_steps"
            )
        if WARMUPS[self.warmup].value is None:
            if self.warmup_steps:
                raise ValueError(f"warmup_steps must be 0 when warmup={self.warmup!r}, got {self.warmup_steps}")
            if self.warmup_start is not None:
                raise ValueError(f"warmup_start must be None when warmup={self.warmup!r}, got {self.warmup_start!r}")
        else:
            if self.warmup_start is None:
                raise ValueError(f"warmup_start must be a number >= 0 for warmup={self.warmup!r}, got None")
            set_field("warmup_start", check_non_negative("warmup_start", self.warmup_start))
            if self.warmup_steps and self.warmup_start > self.peak:
                raise ValueError(
                    f"warmup_start={self.warmup_start!r} is above peak={self.peak!r}: the warmup would lower the LR "
                    "(a warm-down); allowed: 0 <= warmup_start <= peak, or warmup_steps=0 (no warmup)"
                )
        check_choice("decay", self.decay, DECAYS)  # the live table: a new kind is one DECAYS entry
        check_choice("milestone_unit", self.milestone_unit, MILESTONE_UNITS)
        if self.steps_per_epoch is not None:
            set_field("steps_per_epoch", check_positive_int("steps_per_epoch", self.steps_per_epoch))
        set_field(
            "milestones",
            validated_milestones(
                self.milestones,
                decay=self.decay,
                milestone_unit=self.milestone_unit,
                steps_per_epoch=self.steps_per_epoch,
                warmup_steps=self.warmup_steps,
                total_steps=self.total_steps,
            ),
        )
        for name, value in checked_decay_factors(self.gamma, self.power, self.end_lr).items():
            set_field(name, value)
        if DECAYS[self.decay].ends_at_end_lr and self.end_lr > self.peak:
            raise ValueError(
                f"end_lr must be <= peak for decay={self.decay!r}, got end_lr={self.end_lr!r} > peak={self.peak!r}"
            )

    # -- evaluation -------------------------------------------------------
    def __call__(self, step: int) -> float:
        """The LR of optimizer update ``step`` (an integer >= 0)."""
        step = check_non_negative_int("step", step, meaning="optimizer updates counted from 0")
        t = min(step, self.total_steps)
        if t < self.warmup_steps:
            return WARMUPS[self.warmup].value(t, self.warmup_steps, self.warmup_start, self.peak)
        return DECAYS[self.decay].value(self, t)

    @property
    def milestone_steps(self) -> tuple[int, ...]:
        """The first step at which each milestone applies (empty unless ``decay='step'``).

        Example:
            >>> from hvd_largebatch.schedules import goyal
            >>> goyal(0.1, 256, 8192, steps_per_epoch=156, epochs=90).milestone_steps
            (4680, 9360, 12480)
        """
        if self.milestone_unit == "step":
            return tuple(int(m) for m in self.milestones)
        steps = []
        for milestone in self.milestones:
            first = math.ceil(milestone * self.steps_per_epoch)
            # Agree exactly with the step decay's test "milestone <= t / S" despite rounding.
            while first > 0 and milestone <= (first - 1) / self.steps_per_epoch:
                first -= 1
            while milestone > first / self.steps_per_epoch:
                first += 1
            steps.append(first)
        return tuple(steps)

    def describe(self) -> str:
        """A one-line human-readable summary.

        Example:
            >>> from hvd_largebatch.schedules import goyal
            >>> goyal(0.1, 256, 8192, steps_per_epoch=156, epochs=90).describe()
            'gradual warmup over 780 steps from 0.1 to peak 3.2, then step decay x0.1 at epochs 30, 60, 80; 14040 steps'
        """
        warmup = "none" if self.warmup_steps == 0 else self.warmup
        text = WARMUPS[warmup].describe(self.warmup_steps, self.warmup_start, self.peak)
        return f"{text}, then {DECAYS[self.decay].describe(self)}; {self.total_steps} steps"

    # -- serialisation ----------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Every field as a JSON-able dict; :meth:`from_config` inverts it exactly."""
        return config_of(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        """Rebuilds (and re-validates) a schedule from :meth:`to_config`'s dict.

        Raises:
            ValueError: naming ``config`` when it is not a mapping, or naming
                unknown or missing keys, or any invalid field.
        """
        return from_config_of(cls, config, required=("peak", "total_steps"))
