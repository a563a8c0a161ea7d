"""The critical batch: fit ``S(B) = S_min * (1 + B_crit / B)`` to steps-to-target against batch size.

McCandlish et al. 2018 model the steps ``S`` and examples ``E = B*S`` a run
needs to reach a fixed target at batch ``B`` as

    S(B) = S_min * (1 + B_crit / B),        E(B) = E_min * (1 + B / B_crit),

with ``B_crit = E_min / S_min``: below ``B_crit`` doubling the batch nearly
halves the steps (perfect scaling), above it the steps barely move. ``S`` is
linear in ``1/B``, so ordinary least squares of ``S`` on ``x = 1/B``,
``S = a + b*x``, gives ``S_min = a`` and ``B_crit = b / a`` (the math contract,
"Steps to a target against batch size"). When ``a <= 0`` or ``b <= 0`` the
points show no bend inside the measured range and ``B_crit`` is None.

Framework-free (standard library only).

Example:
    >>> fit = fit_critical_batch([128, 512, 2048, 8192], [1650, 450, 150, 75])
    >>> round(fit.s_min), round(fit.b_crit)
    (50, 4096)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["CriticalBatchFit", "fit_critical_batch", "predicted_steps"]


@dataclasses.dataclass(frozen=True)
class CriticalBatchFit:
    """The least-squares fit of ``S = S_min*(1 + B_crit/B)``.

    Attributes:
        s_min: the intercept ``a`` (steps at infinite batch); may be <= 0 when there is no bend.
        slope: ``b = S_min * B_crit`` (steps times examples: the perfect-scaling part).
        b_crit: ``b / a`` when both are positive, else None.
        e_min: ``b`` again, read as ``E_min = S_min * B_crit`` (examples at batch -> 0), or None.
        points: how many ``(B, S)`` points were fitted.
        r_squared: coefficient of determination of the fit in ``S`` (1.0 for a perfect fit).
        max_relative_error: the largest ``|S_fit - S| / S`` over the points.
    """

    s_min: float
    slope: float
    b_crit: float | None
    e_min: float | None
    points: int
    r_squared: float
    max_relative_error: float

    def to_config(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)


def predicted_steps(s_min: float, b_crit: float, batch: float) -> float:
    """``S_min * (1 + B_crit / B)``."""
    return s_min * (1.0 + b_crit / batch)


def fit_critical_batch(batches: Sequence[float], steps: Sequence[float]) -> CriticalBatchFit | None:
    """Least squares of ``steps`` on ``1/batches``; None when fewer than two distinct batch sizes.

    Args:
        batches: global batch sizes, > 0.
        steps: steps to target at each batch (finite, > 0; leave out cells
            that did not reach the target).

    Raises:
        ValueError: naming ``batches`` or ``steps`` (length mismatch, non-positive or non-finite values).
    """
    if len(batches) != len(steps):
        raise ValueError(f"batches and steps must have the same length, got {len(batches)} and {len(steps)}")
    for name, values in (("batches", batches), ("steps", steps)):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
               or v <= 0]
        if bad:
            raise ValueError(f"{name} must be finite numbers > 0, got {bad[0]!r}")
    if len(set(batches)) < 2:
        return None
    x = [1.0 / float(b) for b in batches]
    y = [float(s) for s in steps]
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    sxx = sum((xi - mean_x) ** 2 for xi in x)
    sxy = sum((xi - mean_x) * (yi - mean_y) for xi, yi in zip(x, y))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    fitted = [intercept + slope * xi for xi in x]
    total = sum((yi - mean_y) ** 2 for yi in y)
    residual = sum((yi - fi) ** 2 for yi, fi in zip(y, fitted))
    r_squared = 1.0 - residual / total if total > 0 else 1.0
    bend = intercept > 0 and slope > 0
    return CriticalBatchFit(
        s_min=intercept,
        slope=slope,
        b_crit=slope / intercept if bend else None,
        e_min=slope if bend else None,
        points=n,
        r_squared=r_squared,
        max_relative_error=max(abs(fi - yi) / yi for yi, fi in zip(y, fitted)),
    )
