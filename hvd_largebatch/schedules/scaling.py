"""LR scaling rules: the peak LR of a large global batch from a base LR tuned at a base batch."""

from __future__ import annotations

import math

from hvd_largebatch.config import check_choice, check_non_negative, check_positive_int

__all__ = ["SCALING_RULES", "scale_lr"]

#: LR scaling rules of :func:`scale_lr`.
SCALING_RULES = ("linear", "sqrt", "none")


def scale_lr(base_lr: float, base_batch: int, global_batch: int, rule: str = "linear") -> float:
    """The peak LR for ``global_batch`` from a ``base_lr`` tuned at ``base_batch``.

    ``linear`` (Goyal et al. 2017, section 2.1): ``base_lr * global_batch / base_batch``.
    ``sqrt`` (variance-preserving; Krizhevsky 2014, used with LAMB):
    ``base_lr * sqrt(global_batch / base_batch)``. ``none``: ``base_lr``.

    Args:
        base_lr: LR that works at ``base_batch`` (finite, >= 0).
        base_batch: reference batch size (Goyal: 256).
        global_batch: batch of one update over all workers; see :func:`global_batch_size`.
        rule: one of ``SCALING_RULES``.

    Raises:
        ValueError: naming the argument and its allowed values.

    Example:
        >>> scale_lr(0.1, 256, 8192)
        3.2
        >>> round(scale_lr(0.1, 256, 1024, "sqrt"), 12), scale_lr(0.1, 256, 8192, "none")
        (0.2, 0.1)
    """
    base_lr = check_non_negative("base_lr", base_lr)
    base_batch = check_positive_int("base_batch", base_batch)
    global_batch = check_positive_int("global_batch", global_batch)
    check_choice("rule", rule, SCALING_RULES)
    ratio = global_batch / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr
