"""Warmup pieces: the LR for ``t < W``, as pure functions of the step (ALGORITHMS.md, "Schedules").

Each kind is one entry of :data:`WARMUPS`: its value for ``t < W`` and its
one-line description. :class:`~hvd_largebatch.schedules.Schedule` joins a
warmup piece with a decay piece at step ``W``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from hvd_largebatch.config import check_non_negative, check_positive_int

__all__ = [
    "WARMUP_KINDS",
    "WARMUP_STARTS",
    "WarmupKind",
    "WARMUPS",
    "gradual_warmup",
    "constant_warmup",
    "warmup_start_lr",
]

#: Symbolic warmup starts accepted by ``make_schedule`` besides a number.
#: ``"base_lr"`` is Goyal's start; ``"peak/world_size"`` is the start of
#: Horovod's ``LearningRateWarmupCallback``.
WARMUP_STARTS = ("base_lr", "peak/world_size")


def gradual_warmup(step: int, warmup_steps: int, start: float, peak: float) -> float:
    """Goyal's per-iteration ramp: ``start + (peak - start) * t / W`` for ``t < W``.

    Example:
        >>> round(gradual_warmup(2, 4, 0.2, 1.0), 12)
        0.6
    """
    return start + (peak - start) * step / warmup_steps


def constant_warmup(step: int, warmup_steps: int, start: float, peak: float) -> float:
    """A constant low LR ``start`` for ``t < W`` (Goyal et al.'s "constant warmup")."""
    return float(start)


@dataclasses.dataclass(frozen=True)
class WarmupKind:
    """One warmup kind: its LR for ``t < W`` and its description.

    Attributes:
        value: ``(t, W, start, peak) -> lr`` for ``0 <= t < W``; None for no warmup.
        describe: ``(W, start, peak) -> text`` (used when ``W > 0``).
    """

    value: Callable[[int, int, float, float], float] | None
    describe: Callable[[int, float, float], str]


#: Every warmup kind; ``"none"`` has no piece (its ``W`` must be 0).
WARMUPS: dict[str, WarmupKind] = {
    "gradual": WarmupKind(
        gradual_warmup, lambda w, start, peak: f"gradual warmup over {w} steps from {start:g} to peak {peak:g}"
    ),
    "constant": WarmupKind(
        constant_warmup, lambda w, start, peak: f"constant warmup at {start:g} for {w} steps, then peak {peak:g}"
    ),
    "none": WarmupKind(None, lambda w, start, peak: f"no warmup, peak {peak:g}"),
}
#: Warmup kinds (ALGORITHMS.md): Goyal's linear ramp, a constant low LR, or none.
WARMUP_KINDS = tuple(WARMUPS)


def warmup_start_lr(
    warmup: str, warmup_start: float | str | None, base_lr: float, peak: float, world_size: int | None
) -> float | None:
    """The numeric warmup start from the user's ``warmup_start`` (see ``make_schedule``).

    Returns None for ``warmup="none"``; ``base_lr`` for None or ``"base_lr"``;
    ``peak / world_size`` for ``"peak/world_size"``; else the number itself.

    Raises:
        ValueError: naming ``warmup_start`` or ``world_size``.
    """
    if world_size is not None:
        world_size = check_positive_int("world_size", world_size)
    if warmup == "none":
        if warmup_start is not None:
            raise ValueError(f"warmup_start must be None when warmup='none', got {warmup_start!r}")
        return None
    if warmup_start is None or warmup_start == "base_lr":
        return base_lr
    if warmup_start == "peak/world_size":
        if world_size is None:
            raise ValueError("world_size is required for warmup_start='peak/world_size', got None")
        return peak / world_size
    if isinstance(warmup_start, str):
        raise ValueError(
            f"warmup_start must be a number >= 0 or one of {', '.join(map(repr, WARMUP_STARTS))}; got {warmup_start!r}"
        )
    return check_non_negative("warmup_start", warmup_start)
