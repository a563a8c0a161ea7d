"""Momentum correction (Goyal et al. 2017, section 2.2): the velocity factor when the LR changes.

This is the one definition of the factor: the float64 oracle, the PyTorch
momentum optimizers and the Keras momentum optimizers all call
:func:`momentum_correction` (the Keras ones with ``xp=keras.ops``, inside a
traced step).
"""

from __future__ import annotations

from typing import Any

from hvd_largebatch.config import check_non_negative

__all__ = ["momentum_correction"]


def momentum_correction(prev_lr: Any, new_lr: Any, xp: Any = None) -> Any:
    """The factor that rescales the velocity when the LR changes (Goyal et al. 2017, section 2.2).

    With the LR inside the velocity (``v = m*v + lr*d``), changing the LR from
    ``prev_lr`` to ``new_lr`` without rescaling ``v`` would let the old rate
    act for several more steps; the optimizer first sets
    ``v = v * new_lr / prev_lr``. When ``prev_lr == 0`` nothing has been
    accumulated at a meaningful rate and the factor is 1 (ALGORITHMS.md).
    The factor never includes the momentum ``m``: the update is
    ``v = m * factor * v + rate * d`` in every framework.

    Args:
        prev_lr: LR of the previous applied update (finite, >= 0; 0 before the first).
        new_lr: LR of this update (finite, >= 0).
        xp: None for Python numbers (validated; returns a float), or an array
            namespace with ``where``, ``not_equal`` and ``ones_like``
            (``numpy``, ``torch``, ``keras.ops``) for tensors, e.g. inside a
            traced training step; tensors are not validated.

    Raises:
        ValueError: naming ``prev_lr`` or ``new_lr`` (numbers only).

    Example:
        >>> momentum_correction(0.1, 3.2), momentum_correction(0.0, 0.1)
        (32.0, 1.0)
        >>> import numpy as np
        >>> momentum_correction(np.array([0.0, 0.5]), np.array([0.2, 1.0]), xp=np).tolist()
        [1.0, 2.0]
    """
    if xp is None:
        prev_lr = check_non_negative("prev_lr", prev_lr)
        new_lr = check_non_negative("new_lr", new_lr)
        return 1.0 if prev_lr == 0 else new_lr / prev_lr
    usable = xp.not_equal(prev_lr, 0)
    safe_prev = xp.where(usable, prev_lr, xp.ones_like(prev_lr))
    return xp.where(usable, new_lr / safe_prev, xp.ones_like(new_lr))
