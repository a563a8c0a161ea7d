"""Tuning per (method, batch): the trials of a quasi-random search, and the choice of the best one.

Shallue et al. 2019 and Nado et al. 2021 show that a comparison of optimizers
or batch sizes means something only when each (method, batch) cell is tuned,
and tuned on the *same budget* for every method. Here every cell gets the
same number of trials, drawn from the same quasi-random (Halton) sequence
over the cell's search space:

* the peak LR, log-uniform in ``[guess * lr_low, guess * lr_high]`` where the
  guess is the method's base LR scaled to the batch by its scaling rule;
* the decay horizon (the schedule's total steps, which is also the trial's
  step budget), log-uniform in ``[guess * horizon_low, guess * horizon_high]``
  around the batch's horizon guess;
* for methods that warm up, the warmup length as a fraction of the horizon,
  uniform in ``[warmup_low, warmup_high]``; methods without warmup have no
  such coordinate, and their LR and horizon points are the same as everyone
  else's (the first two Halton coordinates do not depend on the third).

Trial ``i`` (from 0) uses Halton point ``i + 1`` in bases 2, 3, 5, so the
first trial's LR is the centre of the log range (the guess itself for a
symmetric range), the next two halve and double it, and so on. The trials
are a pure function of the space and the count: a resumed sweep plans the
same ones.

The best trial (:func:`best_trial`) reaches the target in the fewest steps;
among trials that never reach it, or on a tie, the higher best validation
accuracy wins, then the lower trial index. The choice depends only on the
stored results, so it is the same after a resume.

Framework-free (standard library only).

Example:
    >>> space = SearchSpace(trials=3)
    >>> [round(t.lr_multiplier, 3) for t in trial_settings(space, warmup=True)]
    [1.0, 0.5, 2.0]
    >>> best_trial([{"steps_to_target": None, "best_accuracy": 0.9},
    ...             {"steps_to_target": 120, "best_accuracy": 0.97},
    ...             {"steps_to_target": 80, "best_accuracy": 0.96}])
    2
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SearchSpace", "TrialSetting", "halton", "trial_settings", "trial_rank", "best_trial"]


def halton(index: int, base: int) -> float:
    """The ``index``-th element (from 1) of the van der Corput sequence in ``base``, in (0, 1)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
        raise ValueError(f"index must be an integer >= 1, got {index!r}")
    value, fraction = 0.0, 1.0
    while index > 0:
        fraction /= base
        index, digit = divmod(index, base)
        value += digit * fraction
    return value


def _check_range(name: str, low: float, high: float, *, positive: bool) -> None:
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be two finite numbers, got ({low!r}, {high!r})")
    if low > high or (positive and low <= 0) or (not positive and low < 0):
        lower = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must satisfy {lower} and low <= high, got ({low!r}, {high!r})")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What is tuned per (method, batch) and how many trials each cell gets.

    Attributes:
        trials: trials per cell (the same for every method), >= 1.
        lr_low, lr_high: the peak LR's range as multiples of the scaled guess.
        horizon_low, horizon_high: the decay horizon's range as multiples of the batch's horizon guess.
        warmup_low, warmup_high: the warmup fraction of the horizon, for methods that warm up.
    """

    trials: int = 3
    lr_low: float = 0.25
    lr_high: float = 4.0
    horizon_low: float = 0.7
    horizon_high: float = 2.0
    warmup_low: float = 0.0
    warmup_high: float = 0.3

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be an integer >= 1, got {self.trials!r}")
        _check_range("lr range (lr_low, lr_high)", self.lr_low, self.lr_high, positive=True)
        _check_range("horizon range (horizon_low, horizon_high)", self.horizon_low, self.horizon_high, positive=True)
        _check_range("warmup range (warmup_low, warmup_high)", self.warmup_low, self.warmup_high, positive=False)
        if self.warmup_high >= 1:
            raise ValueError(f"warmup_high must be < 1 (a fraction of the horizon), got {self.warmup_high!r}")

    def to_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> SearchSpace:
        return cls(**dict(values))


@dataclasses.dataclass(frozen=True)
class TrialSetting:
    """One trial's hyperparameters, relative to the cell's guesses.

    Attributes:
        index: the trial's number in its cell, from 0.
        lr_multiplier: peak LR / scaled guess.
        horizon_multiplier: decay horizon / horizon guess.
        warmup_fraction: warmup steps / horizon (0 for methods without warmup).
    """

    index: int
    lr_multiplier: float
    horizon_multiplier: float
    warmup_fraction: float

    def to_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _log_point(unit: float, low: float, high: float) -> float:
    return math.exp(math.log(low) + unit * (math.log(high) - math.log(low)))


def trial_settings(space: SearchSpace, *, warmup: bool) -> list[TrialSetting]:
    """The ``space.trials`` settings of a cell (Halton points 1..K in bases 2, 3, 5)."""
    settings = []
    for index in range(space.trials):
        point = index + 1
        warmup_fraction = 0.0
        if warmup:
            warmup_fraction = space.warmup_low + halton(point, 5) * (space.warmup_high - space.warmup_low)
        settings.append(
            TrialSetting(
                index=index,
                lr_multiplier=_log_point(halton(point, 2), space.lr_low, space.lr_high),
                horizon_multiplier=_log_point(halton(point, 3), space.horizon_low, space.horizon_high),
                warmup_fraction=warmup_fraction,
            )
        )
    return settings


def trial_rank(result: Mapping[str, Any], index: int) -> tuple:
    """Sort key of a trial: reached first, then fewer steps, then higher best accuracy, then lower index.

    ``result`` holds ``steps_to_target`` (None when not reached) and ``best_accuracy``.
    """
    steps = result.get("steps_to_target")
    accuracy = result.get("best_accuracy")
    accuracy = -1.0 if accuracy is None or not math.isfinite(accuracy) else float(accuracy)
    return (steps is None, math.inf if steps is None else steps, -accuracy, index)


def best_trial(results: Sequence[Mapping[str, Any]]) -> int:
    """The index (into ``results``) of the best trial (see the module docstring).

    Raises:
        ValueError: when ``results`` is empty.
    """
    if not results:
        raise ValueError("results must hold at least one trial, got none")
    return min(range(len(results)), key=lambda i: trial_rank(results[i], i))
