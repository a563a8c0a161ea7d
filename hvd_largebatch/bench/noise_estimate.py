"""The simple gradient noise scale ``B_simple`` measured during a study run (McCandlish et al. 2018, appendix A).

With ``k`` Horovod ranks each averaging its gradient over ``b_s`` examples,
the study's runners pass, once per step, the mean over ranks of each rank's
squared local gradient norm ``|G_s|^2`` (one scalar allreduce) and the
squared norm of the averaged gradient ``|G_B|^2`` (``b_B = k*b_s``). The
unbiased single-step estimates (the math contract, "Gradient noise scale")

    G2 = (b_B*|G_B|^2 - b_s*|G_s|^2) / (b_B - b_s)          # |G|^2
    S  = (|G_s|^2 - |G_B|^2) / (1/b_s - 1/b_B)              # tr(Sigma)

are noisy (``G2`` can be negative), so each is smoothed by an exponential
moving average with bias correction and only the ratio of the averages,
``B_simple = EMA(S) / EMA(G2)``, is reported.

This is the study's own copy of the estimator: when the package's core
gradient-noise-scale module exists, :class:`NoiseScaleEMA` is the one place
to replace by it.

Framework-free (standard library only).

Example:
    >>> ema = NoiseScaleEMA(small_batch=64, big_batch=128, decay=0.0)
    >>> # |G|^2 = 1, tr(Sigma) = 640: E|G_64|^2 = 11, E|G_128|^2 = 6
    >>> ema.update(11.0, 6.0)
    640.0
"""

from __future__ import annotations

import math

__all__ = ["NoiseScaleEMA"]


class NoiseScaleEMA:
    """Bias-corrected EMAs of the unbiased ``|G|^2`` and ``tr(Sigma)`` estimates, and their ratio.

    Args:
        small_batch: ``b_s``, examples behind one rank's local gradient.
        big_batch: ``b_B``, examples behind the averaged gradient (``> small_batch``).
        decay: EMA decay in ``[0, 1)`` (0 keeps only the latest step).

    Raises:
        ValueError: naming the argument.
    """

    def __init__(self, small_batch: int, big_batch: int, decay: float = 0.95) -> None:
        for name, value in (("small_batch", small_batch), ("big_batch", big_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if big_batch <= small_batch:
            raise ValueError(f"big_batch must be larger than small_batch={small_batch}, got {big_batch!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        self.small_batch, self.big_batch, self.decay = small_batch, big_batch, float(decay)
        self._g2 = self._trace = 0.0
        self._weight = 0.0

    def update(self, small_sq_norm: float, big_sq_norm: float) -> float | None:
        """Adds one step's ``|G_s|^2`` and ``|G_B|^2``; returns the current ``B_simple`` (see :attr:`value`)."""
        if math.isfinite(small_sq_norm) and math.isfinite(big_sq_norm):
            b_s, b_b = self.small_batch, self.big_batch
            g2 = (b_b * big_sq_norm - b_s * small_sq_norm) / (b_b - b_s)
            trace = (small_sq_norm - big_sq_norm) / (1.0 / b_s - 1.0 / b_b)
            self._g2 = self.decay * self._g2 + (1.0 - self.decay) * g2
            self._trace = self.decay * self._trace + (1.0 - self.decay) * trace
            self._weight = self.decay * self._weight + (1.0 - self.decay)
        return self.value

    @property
    def value(self) -> float | None:
        """``EMA(tr Sigma) / EMA(|G|^2)``; None before the first finite step or while ``EMA(|G|^2) <= 0``."""
        if self._weight == 0.0 or self._g2 <= 0.0:
            return None
        return self._trace / self._g2  # the bias corrections (division by the weight) cancel in the ratio
