"""Steps to a target accuracy: the evaluation schedule and the first step that reaches the target.

The study's primary metric (McCandlish et al. 2018; Shallue et al. 2019) is
``S``, the number of optimizer steps a run takes to first reach a target
accuracy fixed before the runs, measured on a held-out validation split.
Every run is evaluated at the same steps, a geometric grid that does not
depend on the method or the batch size:

    grid  = sorted({ceil(ratio**k) : k = 0, 1, ...} that are <= total)
    steps = the grid points at least ``min_gap`` steps after the previous kept one, and ``total``

so ``S`` is known to within a factor ``ratio`` (default ``2**(1/8)``, 9%)
or ``min_gap`` steps, whichever is larger. The study sets ``min_gap`` to the
steps that process as many training examples as one evaluation scores
(``ceil(validation_size / batch)``), so evaluating never costs more than
about a third of training (a forward pass over ``V`` examples against
forward and backward passes over at least ``V``). A run
that never reaches the target within its budget has no ``S``: it is reported
as "not reached", never as the budget.

Framework-free (standard library only).

Example:
    >>> evaluation_steps(20)
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20]
    >>> steps_to_target([(10, 0.5), (20, 0.91), (40, 0.97)], 0.9)
    20
    >>> steps_to_target([(10, 0.5), (20, 0.91)], 0.95) is None
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["DEFAULT_EVALUATION_RATIO", "evaluation_steps", "steps_to_target", "check_target"]

#: Ratio between consecutive evaluation steps: eight evaluations per doubling.
DEFAULT_EVALUATION_RATIO = 2.0 ** (1.0 / 8.0)


def check_target(name: str, value: float) -> float:
    """``value`` as a float in (0, 1); raises ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be an accuracy in (0, 1), got {value!r}")
    return float(value)


def evaluation_steps(total_steps: int, ratio: float = DEFAULT_EVALUATION_RATIO, min_gap: int = 1) -> list[int]:
    """The steps (counted from 1, after that many updates) at which a run of ``total_steps`` is evaluated.

    Args:
        total_steps: the run's step budget (its schedule's total steps), >= 1.
        ratio: growth factor between evaluations, > 1.
        min_gap: fewest steps between two evaluations (the last step is always evaluated), >= 1.

    Raises:
        ValueError: naming ``total_steps``, ``ratio`` or ``min_gap``.

    Example:
        >>> evaluation_steps(100, min_gap=16)
        [16, 32, 50, 70, 91, 100]
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1.0 or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number > 1, got {ratio!r}")
    if isinstance(min_gap, bool) or not isinstance(min_gap, int) or min_gap < 1:
        raise ValueError(f"min_gap must be an integer >= 1, got {min_gap!r}")
    steps: list[int] = []
    k = 0
    while True:
        step = math.ceil(ratio**k - 1e-9)
        if step > total_steps:
            break
        if step - (steps[-1] if steps else 0) >= min_gap and step not in steps:
            steps.append(step)
        k += 1
    if not steps or steps[-1] != total_steps:
        steps.append(total_steps)
    return steps


def steps_to_target(trace: Iterable[Sequence[float]], target: float) -> int | None:
    """The first evaluated step whose accuracy is at least ``target``; None when none is.

    Args:
        trace: ``(step, accuracy)`` pairs in any order (a run's evaluations).
        target: the accuracy to reach, in (0, 1).

    Raises:
        ValueError: naming ``target``.
    """
    target = check_target("target", target)
    reached = [int(step) for step, accuracy in trace if accuracy is not None and accuracy >= target]
    return min(reached) if reached else None
