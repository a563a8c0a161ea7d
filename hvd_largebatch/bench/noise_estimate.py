"""The simple gradient noise scale ``B_simple`` of one study run, computed by the core estimator.

The math (McCandlish et al. 2018, appendix A; the math contract, "Gradient
noise scale") lives in one place, :mod:`hvd_largebatch.noise_scale`: with
``k`` Horovod ranks each averaging its gradient over ``b_s`` examples, the
study's runners pass, once per step, the mean over ranks of each rank's
squared local gradient norm ``|G_s|^2`` (one scalar allreduce) and the
squared norm of the averaged gradient ``|G_B|^2`` (``b_B = k*b_s``);
:class:`~hvd_largebatch.noise_scale.NoiseScaleEstimator` turns them into the
unbiased estimates of ``|G|^2`` and ``tr(Sigma)``, averages each with an EMA
and reports ``B_simple = EMA(S) / EMA(G2)``.

What the study adds: its EMA decay (:data:`STUDY_EMA_DECAY`, shorter than the
monitors' default because a study run lasts tens to hundreds of steps) and
``None`` instead of ``nan`` while the estimate is undefined, so the traces in
``results.json`` stay plain JSON.

Example:
    >>> ema = NoiseScaleEMA(small_batch=64, big_batch=128, ema_decay=0.0)
    >>> # |G|^2 = 1, tr(Sigma) = 640: E|G_64|^2 = 11, E|G_128|^2 = 6
    >>> ema.update(11.0, 6.0)
    640.0
"""

from __future__ import annotations

import math

from hvd_largebatch.noise_scale import NoiseScaleEstimator

__all__ = ["STUDY_EMA_DECAY", "NoiseScaleEMA"]

#: EMA decay per step of a study run: about the last 20 steps count.
STUDY_EMA_DECAY = 0.95


class NoiseScaleEMA:
    """One run's ``B_simple``: the core estimator fed one pair of total squared norms per step.

    Args:
        small_batch: ``b_s``, examples behind one rank's local gradient.
        big_batch: ``b_B``, examples behind the averaged gradient (``> small_batch``).
        ema_decay: EMA decay in ``[0, 1)`` (0 keeps only the latest step).

    Raises:
        ValueError: naming the argument (the core's checks and messages).
    """

    def __init__(self, small_batch: int, big_batch: int, ema_decay: float = STUDY_EMA_DECAY) -> None:
        self.estimator = NoiseScaleEstimator(small_batch, big_batch, ema_decay=ema_decay)
        self._steps = 0

    def update(self, small_sq_norm: float, big_sq_norm: float) -> float | None:
        """Adds one step's ``|G_s|^2`` and ``|G_B|^2`` (a non-finite pair is skipped); returns :attr:`value`."""
        self._steps += 1
        self.estimator.update(small_sq_norm, big_sq_norm, step=self._steps)
        return self.value

    @property
    def value(self) -> float | None:
        """``EMA(tr Sigma) / EMA(|G|^2)``; None until both averages are positive."""
        b_simple = self.estimator.b_simple
        return None if math.isnan(b_simple) else b_simple
