"""Learning-rate scaling and schedules for large-batch training, as pure functions of the step.

This module implements the "Schedules" section of ALGORITHMS.md: the scaling
rule that turns a base LR tuned at a base batch into the peak LR of a larger
global batch, Goyal's per-iteration gradual warmup, and the decays used by the
large-batch papers (step, polynomial, cosine, linear, constant).

A :class:`Schedule` is an immutable record whose call ``schedule(step)`` is a
closed-form function of the optimizer-update count (never the recursive
"multiply the current LR" form), so the PyTorch ``LRScheduler`` and the Keras
``LearningRateSchedule`` only evaluate it, and a resumed run gets the same LR
as an uninterrupted one. World size, rank and steps per epoch are always
arguments: nothing here imports a framework or asks Horovod for its size.

References:
    Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
    1 Hour" (linear scaling rule, gradual warmup, momentum correction).
    You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional
    Networks" (LARS, polynomial decay with power 2).

Example:
    Goyal's ImageNet recipe at a global batch of 8192 (1,281,167 images):

    >>> from hvd_largebatch import schedules
    >>> spe = schedules.steps_per_epoch(1281167, 8192)
    >>> sched = schedules.goyal(0.1, 256, 8192, steps_per_epoch=spe)
    >>> spe, sched.total_steps, sched.warmup_steps
    (156, 14040, 780)
    >>> [round(sched(s), 6) for s in (0, 780, 30 * 156, 60 * 156, 80 * 156)]
    [0.1, 3.2, 0.32, 0.032, 0.0032]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Union

from hvd_largebatch.config import (
    check_bool,
    check_choice,
    check_non_negative,
    check_positive,
    check_positive_int,
)

__all__ = [
    "SCALING_RULES",
    "WARMUP_KINDS",
    "WARMUP_STARTS",
    "DECAY_KINDS",
    "MILESTONE_UNITS",
    "Schedule",
    "scale_lr",
    "make_schedule",
    "goyal",
    "lars_poly",
    "momentum_correction",
    "global_batch_size",
    "per_worker_batch_size",
    "steps_per_epoch",
    "epochs_to_steps",
]

#: LR scaling rules of :func:`scale_lr`.
SCALING_RULES = ("linear", "sqrt", "none")
#: Warmup kinds (ALGORITHMS.md): Goyal's linear ramp, a constant low LR, or none.
WARMUP_KINDS = ("gradual", "constant", "none")
#: Symbolic warmup starts accepted by :func:`make_schedule` besides a number.
#: ``"base_lr"`` is Goyal's start; ``"peak/world_size"`` is the start of
#: Horovod's ``LearningRateWarmupCallback``.
WARMUP_STARTS = ("base_lr", "peak/world_size")
#: Decay kinds applied after the warmup.
DECAY_KINDS = ("step", "poly", "cosine", "linear", "constant")
#: Units of step-decay milestones: epochs (compared with ``t / steps_per_epoch``) or steps.
MILESTONE_UNITS = ("epoch", "step")

Number = Union[int, float]


# --------------------------------------------------------------------------
# Argument checks local to schedules (the general ones come from config)
# --------------------------------------------------------------------------
def _is_integer(value: Any) -> bool:
    """True for Python and NumPy integers (never bool), without importing NumPy."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu"


def _check_non_negative_int(name: str, value: Any) -> int:
    if not _is_integer(value) or int(value) < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _check_step(step: Any) -> int:
    if not _is_integer(step) or int(step) < 0:
        raise ValueError(f"step must be an integer >= 0 (optimizer updates counted from 0), got {step!r}")
    return int(step)


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


# --------------------------------------------------------------------------
# Batch-size bookkeeping
# --------------------------------------------------------------------------
def global_batch_size(per_worker_batch: int, world_size: int, backward_passes_per_step: int = 1) -> int:
    """The global batch over which Horovod averages one update's gradients.

    ``global_batch = per_worker_batch * world_size * backward_passes_per_step``
    (``backward_passes_per_step`` is Horovod's local gradient accumulation).

    Args:
        per_worker_batch: examples per worker per backward pass.
        world_size: number of Horovod processes (``hvd.size()``, passed in).
        backward_passes_per_step: backward passes accumulated per update.

    Raises:
        ValueError: naming the argument, unless each is an integer >= 1.

    Example:
        >>> global_batch_size(256, 32)
        8192
        >>> global_batch_size(128, 32, backward_passes_per_step=2)
        8192
    """
    per_worker_batch = check_positive_int("per_worker_batch", per_worker_batch)
    world_size = check_positive_int("world_size", world_size)
    backward_passes_per_step = check_positive_int("backward_passes_per_step", backward_passes_per_step)
    return per_worker_batch * world_size * backward_passes_per_step


def per_worker_batch_size(global_batch: int, world_size: int, backward_passes_per_step: int = 1) -> int:
    """The per-worker batch that makes up ``global_batch``; checks divisibility.

    Args:
        global_batch: the global batch of one update.
        world_size: number of Horovod processes (passed in, never queried).
        backward_passes_per_step: backward passes accumulated per update.

    Returns:
        ``global_batch // (world_size * backward_passes_per_step)``.

    Raises:
        ValueError: naming ``global_batch`` when it is not a multiple of
            ``world_size * backward_passes_per_step`` (every worker must see
            the same number of examples for the allreduce average to be the
            global-batch mean), or naming any argument that is not an integer >= 1.

    Example:
        >>> per_worker_batch_size(8192, 32)
        256
    """
    global_batch = check_positive_int("global_batch", global_batch)
    world_size = check_positive_int("world_size", world_size)
    backward_passes_per_step = check_positive_int("backward_passes_per_step", backward_passes_per_step)
    parts = world_size * backward_passes_per_step
    if global_batch % parts:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by world_size={world_size} x "
            f"backward_passes_per_step={backward_passes_per_step}; allowed: a multiple of {parts}"
        )
    return global_batch // parts


def steps_per_epoch(dataset_size: int, global_batch: int, drop_remainder: bool = True) -> int:
    """Optimizer updates per pass over the data.

    Args:
        dataset_size: number of training examples.
        global_batch: examples per update (all workers).
        drop_remainder: drop the last partial batch (``floor``) or keep it (``ceil``).

    Raises:
        ValueError: naming the argument; also naming ``dataset_size`` when it
            is smaller than ``global_batch`` with ``drop_remainder=True`` (an
            epoch would have no update).

    Example:
        >>> steps_per_epoch(1281167, 8192), steps_per_epoch(1281167, 8192, drop_remainder=False)
        (156, 157)
    """
    dataset_size = check_positive_int("dataset_size", dataset_size)
    global_batch = check_positive_int("global_batch", global_batch)
    check_bool("drop_remainder", drop_remainder)
    steps = dataset_size // global_batch if drop_remainder else -(-dataset_size // global_batch)
    if steps < 1:
        raise ValueError(
            f"dataset_size={dataset_size} is smaller than global_batch={global_batch} with "
            "drop_remainder=True: an epoch would have no step; allowed: dataset_size >= global_batch"
        )
    return steps


def epochs_to_steps(epochs: Number, steps_per_epoch: int, argument: str = "epochs") -> int:
    """``epochs * steps_per_epoch`` rounded to the nearest step (halves round up).

    Args:
        epochs: a number of epochs >= 0; fractions are allowed (0.5 epoch of warmup).
        steps_per_epoch: updates per epoch, an integer >= 1.
        argument: the name used in error messages.

    Raises:
        ValueError: naming ``argument`` or ``steps_per_epoch``.

    Example:
        >>> epochs_to_steps(5, 156), epochs_to_steps(0.5, 155)
        (780, 78)
    """
    epochs = check_non_negative(argument, epochs)
    steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
    return _round_half_up(epochs * steps_per_epoch)


# --------------------------------------------------------------------------
# Scaling rule and momentum correction
# --------------------------------------------------------------------------
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


def momentum_correction(prev_lr: float, new_lr: float) -> float:
    """The factor that rescales the velocity when the LR changes (Goyal et al. 2017, section 2.2).

    With the LR inside the velocity (``v = m*v + lr*d``), changing the LR from
    ``prev_lr`` to ``new_lr`` without rescaling ``v`` would let the old rate
    act for several more steps; the optimizer first sets
    ``v = v * new_lr / prev_lr``. When ``prev_lr == 0`` nothing has been
    accumulated at a meaningful rate and the factor is 1 (ALGORITHMS.md).

    Args:
        prev_lr: LR of the previous applied update (finite, >= 0).
        new_lr: LR of this update (finite, >= 0).

    Raises:
        ValueError: naming ``prev_lr`` or ``new_lr``.

    Example:
        >>> momentum_correction(0.1, 3.2), momentum_correction(0.0, 0.1)
        (32.0, 1.0)
    """
    prev_lr = check_non_negative("prev_lr", prev_lr)
    new_lr = check_non_negative("new_lr", new_lr)
    return 1.0 if prev_lr == 0 else new_lr / prev_lr


# --------------------------------------------------------------------------
# The schedule record
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Schedule:
    """An immutable, serialisable learning-rate schedule ``lr(step)``.

    Steps count optimizer updates from 0; ``W`` is ``warmup_steps``, ``T``
    ``total_steps``, ``S`` ``steps_per_epoch``. For ``t < W``:

    * ``gradual`` (Goyal): ``lr(t) = start + (peak - start) * t / W``;
    * ``constant``: ``lr(t) = start``.

    For ``t >= W``, with ``u = t - W`` and ``D = T - W``:

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
        warmup_start: the warmup's ``start`` LR (a number >= 0); required
            for ``gradual`` and ``constant``, None for ``none``.
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
        check_choice("warmup", self.warmup, WARMUP_KINDS)
        set_field("warmup_steps", _check_non_negative_int("warmup_steps", self.warmup_steps))
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} is longer than training (total_steps={self.total_steps}); "
                "allowed: 0 <= warmup_steps <= total_steps"
            )
        if self.warmup == "none":
            if self.warmup_steps:
                raise ValueError(f"warmup_steps must be 0 when warmup='none', got {self.warmup_steps}")
            if self.warmup_start is not None:
                raise ValueError(f"warmup_start must be None when warmup='none', got {self.warmup_start!r}")
        else:
            if self.warmup_start is None:
                raise ValueError(f"warmup_start must be a number >= 0 for warmup={self.warmup!r}, got None")
            set_field("warmup_start", check_non_negative("warmup_start", self.warmup_start))
        check_choice("decay", self.decay, DECAY_KINDS)
        check_choice("milestone_unit", self.milestone_unit, MILESTONE_UNITS)
        if self.steps_per_epoch is not None:
            set_field("steps_per_epoch", check_positive_int("steps_per_epoch", self.steps_per_epoch))
        set_field("milestones", self._validated_milestones())
        set_field("gamma", check_positive("gamma", self.gamma))
        if self.gamma > 1:
            raise ValueError(f"gamma must be in (0, 1] (a decay factor), got {self.gamma!r}")
        set_field("power", check_positive("power", self.power))
        set_field("end_lr", check_non_negative("end_lr", self.end_lr))
        if self.decay in ("poly", "cosine", "linear") and self.end_lr > self.peak:
            raise ValueError(
                f"end_lr must be <= peak for decay={self.decay!r}, got end_lr={self.end_lr!r} > peak={self.peak!r}"
            )

    def _validated_milestones(self) -> tuple[Number, ...]:
        raw = self.milestones
        if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
            raise ValueError(f"milestones must be a sequence of numbers, got {raw!r}")
        raw = tuple(raw)
        if self.decay != "step":
            if raw:
                raise ValueError(f"milestones are only used by decay='step', got milestones={raw!r} with decay={self.decay!r}")
            return ()
        if not raw:
            raise ValueError("milestones must hold at least one milestone for decay='step', got ()")
        if self.milestone_unit == "epoch" and self.steps_per_epoch is None:
            raise ValueError("steps_per_epoch is required for milestones in epochs (milestone_unit='epoch'), got None")
        values: list[Number] = []
        for value in raw:
            if self.milestone_unit == "step":
                if not _is_integer(value):
                    raise ValueError(f"milestones must be integers with milestone_unit='step', got {value!r}")
                value = int(value)
            else:
                value = check_positive("milestones", value)
                value = int(value) if value.is_integer() else value
            values.append(value)
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {raw!r}")
        # The same comparisons as __call__: a milestone must take effect after the
        # warmup (not at or before step W) and no later than step T.
        scale = self.steps_per_epoch if self.milestone_unit == "epoch" else 1
        warmup_end, end = self.warmup_steps / scale, self.total_steps / scale
        for value in values:
            if not warmup_end < value <= end:
                unit = "epoch" if scale != 1 else "step"
                raise ValueError(
                    f"milestones must lie after the warmup and within training, i.e. in "
                    f"({warmup_end:g}, {end:g}] ({unit}s); got {value!r}"
                )
        return tuple(values)

    # -- evaluation -------------------------------------------------------
    def __call__(self, step: int) -> float:
        """The LR of optimizer update ``step`` (an integer >= 0)."""
        t = min(_check_step(step), self.total_steps)
        warmup_steps = self.warmup_steps
        if t < warmup_steps:
            if self.warmup == "gradual":
                return self.warmup_start + (self.peak - self.warmup_start) * t / warmup_steps
            return float(self.warmup_start)
        if self.decay == "constant":
            return self.peak
        if self.decay == "step":
            position = t / self.steps_per_epoch if self.milestone_unit == "epoch" else t
            passed = sum(1 for milestone in self.milestones if milestone <= position)
            return self.peak * self.gamma**passed
        span = self.total_steps - warmup_steps
        progress = (t - warmup_steps) / span if span else 1.0
        if self.decay == "cosine":
            return self.end_lr + (self.peak - self.end_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0
        power = 1.0 if self.decay == "linear" else self.power
        return self.end_lr + (self.peak - self.end_lr) * (1.0 - progress) ** power

    @property
    def milestone_steps(self) -> tuple[int, ...]:
        """The first step at which each milestone applies (empty unless ``decay='step'``).

        Example:
            >>> goyal(0.1, 256, 8192, steps_per_epoch=156).milestone_steps
            (4680, 9360, 12480)
        """
        if self.milestone_unit == "step":
            return tuple(int(m) for m in self.milestones)
        steps = []
        for milestone in self.milestones:
            first = math.ceil(milestone * self.steps_per_epoch)
            # Agree exactly with __call__'s test "milestone <= t / S" despite rounding.
            while first > 0 and milestone <= (first - 1) / self.steps_per_epoch:
                first -= 1
            while milestone > first / self.steps_per_epoch:
                first += 1
            steps.append(first)
        return tuple(steps)

    def describe(self) -> str:
        """A one-line human-readable summary.

        Example:
            >>> goyal(0.1, 256, 8192, steps_per_epoch=156).describe()
            'gradual warmup over 780 steps from 0.1 to peak 3.2, then step decay x0.1 at epochs 30, 60, 80; 14040 steps'
        """
        if self.warmup == "none" or self.warmup_steps == 0:
            text = f"no warmup, peak {self.peak:g}"
        elif self.warmup == "gradual":
            text = f"gradual warmup over {self.warmup_steps} steps from {self.warmup_start:g} to peak {self.peak:g}"
        else:
            text = f"constant warmup at {self.warmup_start:g} for {self.warmup_steps} steps, then peak {self.peak:g}"
        if self.decay == "step":
            unit = "epochs" if self.milestone_unit == "epoch" else "steps"
            detail = f"step decay x{self.gamma:g} at {unit} {', '.join(f'{m:g}' for m in self.milestones)}"
        elif self.decay == "poly":
            detail = f"poly decay (power {self.power:g}) to {self.end_lr:g}"
        elif self.decay in ("cosine", "linear"):
            detail = f"{self.decay} decay to {self.end_lr:g}"
        else:
            detail = "constant"
        return f"{text}, then {detail}; {self.total_steps} steps"

    # -- serialisation ----------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Every field as a JSON-able dict; :meth:`from_config` inverts it exactly."""
        values = dataclasses.asdict(self)
        values["milestones"] = list(self.milestones)
        return values

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        """Rebuilds (and re-validates) a schedule from :meth:`to_config`'s dict.

        Raises:
            ValueError: naming ``config`` when it is not a mapping, or naming
                unknown or missing keys, or any invalid field.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping from Schedule.to_config(), got {config!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise ValueError(f"unknown Schedule config key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
        missing = [name for name in ("peak", "total_steps") if name not in config]
        if missing:
            raise ValueError(f"Schedule config is missing required key(s) {', '.join(missing)}")
        values = dict(config)
        if "milestones" in values and isinstance(values["milestones"], list):
            values["milestones"] = tuple(values["milestones"])
        return cls(**values)


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------
def make_schedule(
    base_lr: float,
    total_steps: int,
    *,
    base_batch: int | None = None,
    global_batch: int | None = None,
    scaling: str = "linear",
    peak: float | None = None,
    warmup: str = "gradual",
    warmup_steps: int = 0,
    warmup_start: float | str | None = None,
    world_size: int | None = None,
    decay: str = "constant",
    milestones: Iterable[Number] = (),
    milestone_unit: str = "epoch",
    steps_per_epoch: int | None = None,
    gamma: float = 0.1,
    power: float = 2.0,
    end_lr: float = 0.0,
) -> Schedule:
    """Builds a validated :class:`Schedule` from the user's terms (see its docstring for the math).

    The peak LR is, in order of precedence: ``peak`` if given; else
    ``scale_lr(base_lr, base_batch, global_batch, scaling)`` when both batches
    are given; else ``base_lr`` itself.

    Args:
        base_lr: LR tuned at ``base_batch`` (Goyal's ``eta``); also the default warmup start.
        total_steps: optimizer updates in the whole run (``T``).
        base_batch: reference batch of ``base_lr``; give with ``global_batch``.
        global_batch: batch of one update over all workers.
        scaling: rule of :func:`scale_lr`, one of ``SCALING_RULES``.
        peak: explicit peak LR; excludes ``base_batch``/``global_batch``.
        warmup: one of ``WARMUP_KINDS``; ``gradual`` with ``warmup_steps=0`` is no warmup.
        warmup_steps: ``W``; 0 <= W <= total_steps.
        warmup_start: where the warmup starts: None or ``"base_lr"`` (Goyal,
            the default), ``"peak/world_size"`` (Horovod's
            ``LearningRateWarmupCallback``; needs ``world_size``), or a number >= 0.
            Ignored (must stay None) when ``warmup="none"``.
        world_size: number of workers, only for ``warmup_start="peak/world_size"``.
        decay: one of ``DECAY_KINDS``.
        milestones: ``step`` decay milestones, in ``milestone_unit`` units.
        milestone_unit: ``"epoch"`` (needs ``steps_per_epoch``) or ``"step"``.
        steps_per_epoch: ``S``; needed for epoch milestones, kept as metadata otherwise.
        gamma: ``step`` decay factor in (0, 1].
        power: ``poly`` exponent (> 0).
        end_lr: final LR of ``poly``, ``cosine`` and ``linear``.

    Raises:
        ValueError: naming the offending argument and its allowed values.

    Example:
        Horovod-style warmup from ``peak / world_size`` over 100 steps, then cosine:

        >>> s = make_schedule(0.1, 1000, base_batch=256, global_batch=2048, warmup_steps=100,
        ...                   warmup_start="peak/world_size", world_size=8, decay="cosine")
        >>> round(s(0), 6), round(s(100), 6), round(s(550), 6), s(1000)
        (0.1, 0.8, 0.4, 0.0)
    """
    base_lr = check_non_negative("base_lr", base_lr)
    check_choice("scaling", scaling, SCALING_RULES)
    if peak is not None:
        if base_batch is not None or global_batch is not None:
            raise ValueError("peak excludes base_batch/global_batch: pass either an explicit peak or the two batches")
        peak = check_non_negative("peak", peak)
    elif base_batch is not None or global_batch is not None:
        if base_batch is None or global_batch is None:
            missing = "base_batch" if base_batch is None else "global_batch"
            raise ValueError(f"{missing} is required when the other batch size is given (LR scaling needs both)")
        peak = scale_lr(base_lr, base_batch, global_batch, scaling)
    else:
        peak = base_lr
    check_choice("warmup", warmup, WARMUP_KINDS)
    if world_size is not None:
        world_size = check_positive_int("world_size", world_size)
    if warmup == "none":
        start = None
        if warmup_start is not None:
            raise ValueError(f"warmup_start must be None when warmup='none', got {warmup_start!r}")
    elif warmup_start is None or warmup_start == "base_lr":
        start = base_lr
    elif warmup_start == "peak/world_size":
        if world_size is None:
            raise ValueError("world_size is required for warmup_start='peak/world_size', got None")
        start = peak / world_size
    elif isinstance(warmup_start, str):
        raise ValueError(
            f"warmup_start must be a number >= 0 or one of {', '.join(map(repr, WARMUP_STARTS))}; got {warmup_start!r}"
        )
    else:
        start = check_non_negative("warmup_start", warmup_start)
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
        raise ValueError(f"milestones must be a sequence of numbers, got {milestones!r}")
    return Schedule(
        peak=peak,
        total_steps=total_steps,
        warmup=warmup,
        warmup_steps=warmup_steps,
        warmup_start=start,
        decay=decay,
        milestones=tuple(milestones),
        milestone_unit=milestone_unit,
        steps_per_epoch=steps_per_epoch,
        gamma=gamma,
        power=power,
        end_lr=end_lr,
    )


def _epoch_budget(epochs: Number, warmup_epochs: Number, steps_per_epoch: int) -> tuple[int, int]:
    """``(total_steps, warmup_steps)`` of a recipe given in epochs, with checks naming the epoch arguments."""
    steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
    epochs = check_positive("epochs", epochs)
    warmup_epochs = check_non_negative("warmup_epochs", warmup_epochs)
    if warmup_epochs > epochs:
        raise ValueError(
            f"warmup_epochs={warmup_epochs:g} is longer than training (epochs={epochs:g}); "
            "allowed: 0 <= warmup_epochs <= epochs"
        )
    total = epochs_to_steps(epochs, steps_per_epoch, "epochs")
    if total < 1:
        raise ValueError(f"epochs={epochs:g} gives no step at steps_per_epoch={steps_per_epoch}")
    return total, epochs_to_steps(warmup_epochs, steps_per_epoch, "warmup_epochs")


def goyal(
    base_lr: float,
    base_batch: int,
    global_batch: int,
    steps_per_epoch: int,
    epochs: Number = 90,
    warmup_epochs: Number = 5,
    milestones: Iterable[Number] = (30, 60, 80),
    gamma: float = 0.1,
    *,
    warmup_start: float | str | None = None,
    world_size: int | None = None,
) -> Schedule:
    """Goyal et al. 2017's ImageNet recipe: gradual warmup, then step decay.

    ``peak = base_lr * global_batch / base_batch`` (linear scaling rule); for
    the first ``warmup_epochs`` the LR rises per iteration,
    ``lr(t) = base_lr + (peak - base_lr) * t / W``; afterwards it is
    ``peak * gamma ** k`` with ``k`` the milestones (epochs, counted from the
    start of training) passed by ``t / steps_per_epoch``. The paper's values
    are the defaults: 90 epochs, 5 warmup epochs, x0.1 at epochs 30, 60, 80.

    Args:
        base_lr: LR at ``base_batch`` (paper: 0.1 at 256).
        base_batch: reference batch.
        global_batch: batch of one update over all workers.
        steps_per_epoch: updates per epoch (see :func:`steps_per_epoch`).
        epochs: training length; fractional epochs round to the nearest step.
        warmup_epochs: warmup length (<= epochs); 0 disables the warmup.
        milestones: step-decay epochs, increasing, after the warmup, within training.
        gamma: decay factor per milestone.
        warmup_start: see :func:`make_schedule` (default ``base_lr``, the paper's).
        world_size: workers, for ``warmup_start="peak/world_size"``.

    Raises:
        ValueError: naming the offending argument.

    Example:
        >>> s = goyal(0.1, 256, 8192, steps_per_epoch=156)
        >>> round(s(1), 6), round(s(779), 6), s(780)
        (0.103974, 3.196026, 3.2)
    """
    total, warm = _epoch_budget(epochs, warmup_epochs, steps_per_epoch)
    return make_schedule(
        base_lr,
        total,
        base_batch=base_batch,
        global_batch=global_batch,
        scaling="linear",
        warmup="gradual",
        warmup_steps=warm,
        warmup_start=warmup_start,
        world_size=world_size,
        decay="step",
        milestones=milestones,
        milestone_unit="epoch",
        steps_per_epoch=steps_per_epoch,
        gamma=gamma,
    )


def lars_poly(
    base_lr: float,
    base_batch: int,
    global_batch: int,
    steps_per_epoch: int,
    epochs: Number,
    warmup_epochs: Number = 5,
    power: float = 2.0,
    end_lr: float = 0.0,
    *,
    scaling: str = "linear",
    warmup_start: float | str | None = None,
    world_size: int | None = None,
) -> Schedule:
    """The LARS paper's schedule (You, Gitman, Ginsburg 2017): warmup, then polynomial decay.

    ``peak = scale_lr(base_lr, base_batch, global_batch, scaling)``; gradual
    warmup from ``base_lr`` (Goyal's ramp; the paper warms up linearly too but
    does not fix the start, so we use Goyal's) over ``warmup_epochs``, then
    ``lr = end_lr + (peak - end_lr) * (1 - u / D) ** power`` with
    ``u = t - W``, ``D = T - W`` (paper: ``power = 2``, ``end_lr = 0``).

    Args:
        base_lr: LR at ``base_batch``.
        base_batch: reference batch.
        global_batch: batch of one update over all workers.
        steps_per_epoch: updates per epoch.
        epochs: training length.
        warmup_epochs: warmup length (<= epochs).
        power: polynomial exponent (> 0).
        end_lr: LR at the last step (0 <= end_lr <= peak).
        scaling: one of ``SCALING_RULES`` (default linear, as the paper).
        warmup_start: see :func:`make_schedule`.
        world_size: workers, for ``warmup_start="peak/world_size"``.

    Raises:
        ValueError: naming the offending argument.

    Example:
        >>> s = lars_poly(2.0, 256, 8192, steps_per_epoch=100, epochs=10, warmup_epochs=2)
        >>> s(0), s(200), s(600), s(1000)
        (2.0, 64.0, 16.0, 0.0)
    """
    total, warm = _epoch_budget(epochs, warmup_epochs, steps_per_epoch)
    return make_schedule(
        base_lr,
        total,
        base_batch=base_batch,
        global_batch=global_batch,
        scaling=scaling,
        warmup="gradual",
        warmup_steps=warm,
        warmup_start=warmup_start,
        world_size=world_size,
        decay="poly",
        steps_per_epoch=steps_per_epoch,
        power=power,
        end_lr=end_lr,
    )
