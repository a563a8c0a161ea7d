"""The gradient noise scale (critical batch size) estimator, framework-free: estimates, EMA and advice.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training",
appendix A). With ``|G_b|^2`` the squared norm of a gradient averaged over
``b`` examples, ``E|G_b|^2 = |G|^2 + tr(Sigma)/b``. Squared norms measured at
a small batch ``b_s`` and a big batch ``b_B`` give unbiased estimates::

    G2 = (b_B*|G_B|^2 - b_s*|G_s|^2) / (b_B - b_s)      # of |G|^2
    S  = (|G_s|^2 - |G_B|^2) / (1/b_s - 1/b_B)          # of tr(Sigma)
    B_simple = EMA(S) / EMA(G2)                          # a ratio of averages

Data-parallel training has both batch sizes for free: each rank's local
gradient (``b_s``) before the allreduce, the averaged one (``b_B = k*b_s``)
after it. With one rank, the micro-batches of gradient accumulation are the
small batches (:func:`batch_sizes`).

The PyTorch and Keras monitors (``hvd_largebatch.torch_impl.NoiseScaleMonitor``,
``hvd_largebatch.tf.NoiseScaleMonitor``) measure the squared norms and feed
them to :class:`NoiseScaleEstimator`; the argument checks and error messages
live here so that both frameworks raise the same ones.

Example:
    >>> from hvd_largebatch.noise_scale import NoiseScaleEstimator
    >>> est = NoiseScaleEstimator(small_batch=32, big_batch=64, ema_decay=0.9)
    >>> est.update(small_sq_norms=[3.0], big_sq_norms=[2.0], step=0)
    True
    >>> est.g2, est.s     # (64*2 - 32*3)/32 = 1;  (3 - 2)/(1/32 - 1/64) = 64
    (1.0, 64.0)
    >>> est.b_simple
    64.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hvd_largebatch import config as _config

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_EMA_DECAY",
    "HOROVOD_NOT_INITIALISED",
    "NOT_DISTRIBUTED",
    "UNSUPPORTED_OP",
    "check_interval",
    "check_batch_size",
    "check_ema_decay",
    "batch_sizes",
    "unbiased_estimates",
    "NoiseScaleEstimator",
    "MonitorReadings",
    "advice",
    "exact_estimates_from_per_example_gradients",
]

#: Measure every step by default (the cost is reported in the README).
DEFAULT_INTERVAL = 1
#: EMA decay per measurement: about the last 100 measurements count.
DEFAULT_EMA_DECAY = 0.99


#: The monitors' shared error messages (``str.format`` templates), so both frameworks raise the same.
HOROVOD_NOT_INITIALISED = "NoiseScaleMonitor needs Horovod initialised: call {module}.init() first"
NOT_DISTRIBUTED = (
    "optimizer must be a Horovod DistributedOptimizer (hvd_largebatch's DistributedOptimizer or Horovod's), "
    "got {optimizer}: the noise scale is measured where the gradients are averaged"
)
UNSUPPORTED_OP = (
    "optimizer op must be Average or Sum to measure the gradient noise scale, got {op!r} "
    "(Adasum does not produce the averaged gradient)"
)


def check_interval(interval: Any, name: str = "interval") -> int:
    """``interval`` (steps between measurements) as an int; raises ValueError naming ``name`` unless it is an integer >= 1."""
    return _config.check_positive_int(name, interval)


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` (examples per rank in one backward pass) as an int; raises ValueError unless it is >= 1."""
    return _config.check_positive_int("batch_size", batch_size)


def check_ema_decay(ema_decay: Any) -> float:
    """``ema_decay`` as a float; raises ValueError unless it is a number in [0, 1)."""
    return _config.check_unit_interval("ema_decay", ema_decay)


def batch_sizes(batch_size: Any, world_size: Any, backward_passes_per_step: Any = 1) -> tuple[int, int]:
    """The small and big batch sizes ``(b_s, b_B)`` of the estimator under data parallelism.

    * ``world_size > 1``: the small batch is one rank's local gradient,
      ``b_s = batch_size * backward_passes_per_step``; the big batch is the
      averaged gradient, ``b_B = world_size * b_s``.
    * ``world_size == 1``: the micro-batches of gradient accumulation are the
      small batches, ``b_s = batch_size``, ``b_B = backward_passes_per_step * batch_size``;
      this needs ``backward_passes_per_step >= 2``.

    Args:
        batch_size: examples per rank in one backward pass.
        world_size: the number of ranks ``k``.
        backward_passes_per_step: backward passes accumulated per update.

    Raises:
        ValueError: naming the argument, for a non-positive integer, or naming
            ``backward_passes_per_step`` with one rank and fewer than 2 passes.
    """
    batch_size = check_batch_size(batch_size)
    world_size = _config.check_positive_int("world_size", world_size)
    passes = _config.check_positive_int("backward_passes_per_step", backward_passes_per_step)
    if world_size > 1:
        return batch_size * passes, world_size * batch_size * passes
    if passes < 2:
        raise ValueError(
            "backward_passes_per_step must be an integer >= 2 to measure the gradient noise scale with one rank "
            f"(the micro-batches of gradient accumulation are the small batches), got {passes!r}"
        )
    return batch_size, passes * batch_size


def _check_sizes(small_batch: Any, big_batch: Any) -> tuple[int, int]:
    small_batch = _config.check_positive_int("small_batch", small_batch)
    big_batch = _config.check_positive_int("big_batch", big_batch)
    if big_batch <= small_batch:
        raise ValueError(f"big_batch must be larger than small_batch={small_batch}, got {big_batch!r}")
    return small_batch, big_batch


def unbiased_estimates(
    small_sq_norm: Any, big_sq_norm: Any, small_batch: int, big_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """The single-step unbiased estimates ``(G2, S)`` of ``|G|^2`` and ``tr(Sigma)``.

    ``G2 = (b_B*|G_B|^2 - b_s*|G_s|^2) / (b_B - b_s)`` and
    ``S = (|G_s|^2 - |G_B|^2) / (1/b_s - 1/b_B)``, elementwise (per tensor
    when given vectors). Each is noisy and ``G2`` can be negative: report
    only ratios of averages (:class:`NoiseScaleEstimator`).

    Args:
        small_sq_norm: ``|G_s|^2``, the mean over the small batches of their squared gradient norms.
        big_sq_norm: ``|G_B|^2``, the squared norm of the big-batch gradient.
        small_batch: ``b_s``.
        big_batch: ``b_B > b_s``.

    Returns:
        ``(G2, S)`` as float64 arrays of the inputs' shape.
    """
    small_batch, big_batch = _check_sizes(small_batch, big_batch)
    small = np.asarray(small_sq_norm, dtype=np.float64)
    big = np.asarray(big_sq_norm, dtype=np.float64)
    g2 = (big_batch * big - small_batch * small) / (big_batch - small_batch)
    s = (small - big) / (1.0 / small_batch - 1.0 / big_batch)
    return g2, s


class NoiseScaleEstimator:
    """Running estimate of the simple noise scale ``B_simple = EMA(S) / EMA(G2)``.

    Every :meth:`update` turns one measurement (squared norms at the two
    batch sizes, one entry per tensor or a single total) into ``(G2, S)``
    with :func:`unbiased_estimates` and folds it into exponential moving
    averages with decay ``d``: ``m_t = d*m_{t-1} + (1-d)*x_t``, reported
    bias-corrected as ``m_t / (1 - d^t)`` (as Adam does). The correction is
    the same factor for both averages, so it cancels in ``B_simple``; it only
    makes :attr:`g2` and :attr:`s` meaningful from the first measurement.
    ``ema_decay=0`` keeps only the last measurement.

    A measurement whose totals are not finite (a step whose gradients
    overflowed) is skipped and counted in :attr:`skipped`; every rank sees
    the same values, so every rank skips the same steps.

    Args:
        small_batch: ``b_s``, examples behind one small-batch gradient.
        big_batch: ``b_B > b_s``, examples behind the big-batch gradient.
        ema_decay: ``d`` in [0, 1).
        tensor_names: names of the per-tensor entries (optional; for :meth:`per_tensor`).

    Raises:
        ValueError: naming the argument, for bad batch sizes or decay.
    """

    def __init__(
        self,
        small_batch: int,
        big_batch: int,
        ema_decay: float = DEFAULT_EMA_DECAY,
        tensor_names: Sequence[str] | None = None,
    ):
        self.small_batch, self.big_batch = _check_sizes(small_batch, big_batch)
        self.ema_decay = check_ema_decay(ema_decay)
        self.tensor_names = None if tensor_names is None else [str(n) for n in tensor_names]
        self.updates = 0
        self.skipped = 0
        self.step: int | None = None
        self.raw_g2 = math.nan
        self.raw_s = math.nan
        self._ema_g2: np.ndarray | None = None
        self._ema_s: np.ndarray | None = None

    def update(self, small_sq_norms: Any, big_sq_norms: Any, step: int) -> bool:
        """Folds one measurement in; returns False (and counts it skipped) when its totals are not finite.

        Args:
            small_sq_norms: ``|G_s|^2`` per tensor (or one total), a 1-D sequence or a number.
            big_sq_norms: ``|G_B|^2``, same shape.
            step: the training step of the measurement (reported in :meth:`advice`).
        """
        small = np.atleast_1d(np.asarray(small_sq_norms, dtype=np.float64))
        big = np.atleast_1d(np.asarray(big_sq_norms, dtype=np.float64))
        if small.shape != big.shape or small.ndim != 1:
            raise ValueError(
                f"small_sq_norms and big_sq_norms must be 1-D of the same length, got shapes {small.shape} and {big.shape}"
            )
        if self._ema_g2 is not None and small.shape != self._ema_g2.shape:
            raise ValueError(f"small_sq_norms must have {self._ema_g2.shape[0]} entries as before, got {small.shape[0]}")
        g2, s = unbiased_estimates(small, big, self.small_batch, self.big_batch)
        total_g2, total_s = float(g2.sum()), float(s.sum())
        if not (math.isfinite(total_g2) and math.isfinite(total_s)):
            self.skipped += 1
            return False
        d = self.ema_decay
        if self._ema_g2 is None:
            self._ema_g2, self._ema_s = np.zeros_like(g2), np.zeros_like(s)
        self._ema_g2 = d * self._ema_g2 + (1.0 - d) * g2
        self._ema_s = d * self._ema_s + (1.0 - d) * s
        self.updates += 1
        self.step = int(step)
        self.raw_g2, self.raw_s = total_g2, total_s
        return True

    def _corrected(self, ema: np.ndarray | None) -> np.ndarray | None:
        if ema is None:
            return None
        return ema / (1.0 - self.ema_decay**self.updates)

    @property
    def g2(self) -> float:
        """The bias-corrected EMA of ``G2`` (estimate of ``|G|^2``), summed over tensors; nan before any update."""
        ema = self._corrected(self._ema_g2)
        return math.nan if ema is None else float(ema.sum())

    @property
    def s(self) -> float:
        """The bias-corrected EMA of ``S`` (estimate of ``tr(Sigma)``), summed over tensors; nan before any update."""
        ema = self._corrected(self._ema_s)
        return math.nan if ema is None else float(ema.sum())

    @property
    def b_simple(self) -> float:
        """``EMA(S) / EMA(G2)``; nan until both averages are positive (noise still dominates the estimate)."""
        return _ratio(self.s, self.g2)

    def per_tensor(self) -> dict[str, dict[str, float]]:
        """``{name: {"b_simple", "g2", "s"}}`` per tensor (names ``"0"``, ``"1"``, ... when none were given)."""
        g2, s = self._corrected(self._ema_g2), self._corrected(self._ema_s)
        if g2 is None:
            return {}
        names = self.tensor_names or [str(i) for i in range(g2.shape[0])]
        if len(names) != g2.shape[0]:
            raise ValueError(f"tensor_names has {len(names)} names for {g2.shape[0]} measured entries")
        return {
            name: {"b_simple": _ratio(float(si), float(gi)), "g2": float(gi), "s": float(si)}
            for name, gi, si in zip(names, g2, s)
        }

    def advice(self, global_batch: int) -> str:
        """A sentence comparing ``global_batch`` with :attr:`b_simple` (:func:`advice`)."""
        return advice(self.b_simple, global_batch, self.step)

    def state_dict(self) -> dict[str, Any]:
        """The estimator's state as plain Python values (JSON-able), for checkpoints."""
        return {
            "small_batch": self.small_batch,
            "big_batch": self.big_batch,
            "ema_decay": self.ema_decay,
            "updates": self.updates,
            "skipped": self.skipped,
            "step": self.step,
            "raw_g2": self.raw_g2,
            "raw_s": self.raw_s,
            "ema_g2": None if self._ema_g2 is None else self._ema_g2.tolist(),
            "ema_s": None if self._ema_s is None else self._ema_s.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output; the batch sizes and decay must match this estimator's."""
        for key in ("small_batch", "big_batch", "ema_decay"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]!r} but this estimator has {getattr(self, key)!r}")
        self.updates, self.skipped, self.step = int(state["updates"]), int(state["skipped"]), state["step"]
        self.raw_g2, self.raw_s = float(state["raw_g2"]), float(state["raw_s"])
        self._ema_g2 = None if state["ema_g2"] is None else np.asarray(state["ema_g2"], dtype=np.float64)
        self._ema_s = None if state["ema_s"] is None else np.asarray(state["ema_s"], dtype=np.float64)


def _ratio(s: float, g2: float) -> float:
    if not (s > 0.0 and g2 > 0.0) or not math.isfinite(s / g2):
        return math.nan
    return s / g2


def _steps_saved_by_doubling(global_batch: float, critical_batch: float) -> float:
    """``1 - S(2B)/S(B)`` with ``S(B) = S_min*(1 + B_crit/B)``: the fraction of steps a doubled batch saves."""
    return 1.0 - (1.0 + critical_batch / (2.0 * global_batch)) / (1.0 + critical_batch / global_batch)


def advice(b_simple: float, global_batch: int, step: int | None = None) -> str:
    """What the measured noise scale says about ``global_batch``, as a sentence a user reads.

    ``B_simple`` estimates the critical batch ``B_crit`` of McCandlish et al.'s
    model ``steps ~ S_min*(1 + B_crit/B)``: well below ``B_crit`` a doubled
    batch nearly halves the steps; well above it, more workers buy few steps.

    Args:
        b_simple: the measured noise scale (nan when not measurable yet).
        global_batch: the global batch of one update (all ranks, all passes).
        step: the step of the measurement, for the sentence.

    Example:
        >>> print(advice(1900.0, 8192, step=3000))  # doctest: +NORMALIZE_WHITESPACE
        B_simple ~ 1,900 at step 3,000; your global batch 8,192 is 4.3x above it: expect diminishing
        returns (McCandlish et al.: steps ~ S_min*(1 + B_crit/B)); doubling it would save about 9% of the steps.
    """
    global_batch = _config.check_positive_int("global_batch", global_batch)
    at = "" if step is None else f" at step {step:,}"
    model = "(McCandlish et al.: steps ~ S_min*(1 + B_crit/B))"
    if not (isinstance(b_simple, (int, float, np.floating)) and math.isfinite(b_simple) and b_simple > 0):
        return (
            f"B_simple not measurable yet{at} (your global batch {global_batch:,}): the averaged estimate of |G|^2 "
            "or tr(Sigma) is not positive (gradient noise dominates the two batch sizes); it becomes defined as "
            "more measurements are averaged."
        )
    ratio = global_batch / b_simple
    saved = _steps_saved_by_doubling(global_batch, b_simple)
    head = f"B_simple ~ {b_simple:,.0f}{at}; your global batch {global_batch:,}"
    if ratio >= 1.25:
        return (
            f"{head} is {ratio:.1f}x above it: expect diminishing returns {model}; "
            f"doubling it would save about {saved:.0%} of the steps."
        )
    if ratio <= 0.8:
        return (
            f"{head} is {1 / ratio:.1f}x below it: a larger batch should still cut the steps almost linearly "
            f"{model}; doubling it would save about {saved:.0%} of the steps."
        )
    return (
        f"{head} is close to it: this is the critical batch, the best trade of steps against examples {model}; "
        f"doubling it would save about {saved:.0%} of the steps."
    )


def exact_estimates_from_per_example_gradients(per_example: Any, small_batch: int) -> tuple[float, float]:
    """The float64 oracle: ``(G2, S)`` in closed form from the per-example gradient matrix.

    For a big batch of ``N`` examples (rows of ``per_example``, flattened
    gradients) split in order into ``k = N / b_s`` small batches with means
    ``m_r`` and overall mean ``m``, the estimator equals
    ``S = b_s * tr(Cov_unbiased(m_1..m_k))`` and ``G2 = |m|^2 - S/N``
    (with ``b_s = 1``, ``S`` is the trace of the unbiased per-example
    gradient covariance). Computed with ``numpy.cov``, independently of
    :func:`unbiased_estimates`, so the two check each other.

    Args:
        per_example: ``(N, P)`` per-example gradients.
        small_batch: ``b_s``, dividing ``N``, ``< N``.
    """
    matrix = np.asarray(per_example, dtype=np.float64)
    n = matrix.shape[0]
    small_batch = _config.check_positive_int("small_batch", small_batch)
    if n % small_batch or n // small_batch < 2:
        raise ValueError(f"small_batch must divide the {n} examples into at least 2 groups, got {small_batch!r}")
    means = matrix.reshape(n // small_batch, small_batch, -1).mean(axis=1)
    covariance = np.atleast_2d(np.cov(means, rowvar=False, ddof=1))
    s = small_batch * float(np.trace(covariance))
    mean = matrix.mean(axis=0)
    return float(mean @ mean) - s / n, s


def _reading(name: str, doc: str) -> property:
    """A read-only float forwarded from the monitor's ``estimator`` (nan while it has none)."""
    return property(lambda self: float("nan") if self.estimator is None else getattr(self.estimator, name), doc=doc)


class MonitorReadings:
    """The readings of both frameworks' ``NoiseScaleMonitor``, forwarded from its core :class:`NoiseScaleEstimator`.

    ``estimator`` is None until the monitor knows its batch sizes (in Keras,
    when ``fit`` starts); every reading is nan until then. A monitor defines
    ``global_batch`` (``b_B``), which :meth:`advice` compares ``B_simple`` with.
    """

    estimator: NoiseScaleEstimator | None = None

    b_simple = _reading("b_simple", "``B_simple = EMA(S) / EMA(G2)``; nan until both averages are positive.")
    g2 = _reading("g2", "Bias-corrected EMA of the unbiased ``|G|^2`` estimates.")
    s = _reading("s", "Bias-corrected EMA of the unbiased ``tr(Sigma)`` estimates.")
    raw_g2 = _reading("raw_g2", "The last single-step ``G2`` (noisy; may be negative).")
    raw_s = _reading("raw_s", "The last single-step ``S`` (noisy).")

    def advice(self) -> str:
        """The measured ``B_simple`` against this run's global batch, as a sentence."""
        return self.estimator.advice(self.global_batch)
