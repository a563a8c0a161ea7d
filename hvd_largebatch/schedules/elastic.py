"""The LR recipe counted in examples seen, and the batch policy: what follows the world size in elastic training.

Under Horovod elastic training workers are lost and added; with a fixed
per-worker batch the global batch ``B`` changes with them. A step-indexed
:class:`~hvd_largebatch.schedules.Schedule` then goes wrong in two ways: its
peak was scaled for the old ``B``, and its warmup length, decay points and
end were counted in updates of the old ``B``, so after a change they arrive
early or late. :class:`ElasticSchedule` holds the recipe in terms that do not
depend on ``B`` (base LR at a base batch, a scaling rule, and every length in
examples) and evaluates it at a point of training ``e`` (examples seen by all
workers so far) for the current global batch:

* ``peak(B) = scale_lr(base_lr, base_batch, B, scaling)``;
* warmup, for ``e < W`` (``W`` = ``warmup_examples``): ``gradual`` gives
  ``start + (peak(B) - start) * e / W``, ``constant`` gives ``start``
  (``start`` defaults to ``base_lr``, Goyal's);
* after it, with ``u = (e - W) / (T - W)`` (``T`` = ``total_examples``):
  ``step`` gives ``peak(B) * gamma ** k`` (``k`` milestones, in examples,
  ``<= e``), ``poly`` ``end_lr + (peak(B) - end_lr) * (1 - u) ** power``,
  ``cosine`` ``end_lr + (peak(B) - end_lr) * (1 + cos(pi * u)) / 2``,
  ``linear`` ``poly`` with power 1, ``constant`` ``peak(B)``;
* for ``e >= T`` the value at ``T``.

The update that starts after ``e`` examples on a global batch ``B`` uses
``lr(e, B)`` and moves training to ``e + B``. While ``B`` stays constant and
every length is a multiple of it, this is exactly the step schedule
:meth:`ElasticSchedule.to_schedule` returns (update ``t`` at ``e = t * B``).
After a change to ``B'`` at ``e0`` the schedule to continue with is
``k -> lr(e0 + k * B', B')``: the same warmup fraction, the same decay epoch,
the peak of the new batch, and the run ends after the same number of examples.

:class:`ElasticBatch` is the batch policy: either the per-worker batch is
kept and ``B = per_worker_batch * world_size * backward_passes_per_step``
follows the world, or ``B`` is kept and the per-worker batch becomes
``B / (world_size * backward_passes_per_step)``
(:func:`~hvd_largebatch.schedules.per_worker_batch_size`), which needs no
rescaling of the LR.

Example:
    Goyal's recipe (0.1 per 256, 5 warmup epochs, x0.1 at epochs 30, 60, 80)
    on 1,280,000 examples, evaluated 2.5 epochs in at two global batches:

    >>> from hvd_largebatch.schedules import ElasticSchedule
    >>> s = ElasticSchedule.from_epochs(0.1, 256, examples_per_epoch=1280000, epochs=90,
    ...                                 warmup_epochs=5, decay="step", milestones=(30, 60, 80))
    >>> round(s.lr(3200000, 8192), 6), round(s.lr(3200000, 4096), 6)
    (1.65, 0.85)
    >>> round(s.lr(31 * 1280000, 8192), 6), round(s.lr(31 * 1280000, 4096), 6)
    (0.32, 0.16)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any, Union

from hvd_largebatch.config import (
    check_choice,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)
from hvd_largebatch.schedules.batch import per_worker_batch_size
from hvd_largebatch.schedules.decay import DECAY_KINDS, cosine_decay, decay_progress, poly_decay, step_decay
from hvd_largebatch.schedules.record import Schedule, checked_decay_factors, config_of, from_config_of
from hvd_largebatch.schedules.scaling import SCALING_RULES, scale_lr
from hvd_largebatch.schedules.warmup import WARMUP_KINDS, WARMUPS

__all__ = ["ElasticSchedule", "ElasticBatch", "check_elastic_schedule"]

Number = Union[int, float]


def _check_examples(name: str, value: Any) -> int:
    return check_non_negative_int(name, value, meaning="a number of examples")


@dataclasses.dataclass(frozen=True)
class ElasticSchedule:
    """An LR recipe whose lengths are in examples, evaluated for the current global batch (math in the module docstring).

    Attributes:
        base_lr: LR tuned at ``base_batch`` (finite, >= 0); also the default warmup start.
        base_batch: the batch ``base_lr`` was tuned at (integer >= 1).
        total_examples: ``T``, the examples of the whole run (all epochs, all workers).
        scaling: one of ``SCALING_RULES`` (``peak(B) = scale_lr(base_lr, base_batch, B, scaling)``).
        warmup: one of ``WARMUP_KINDS``.
        warmup_examples: ``W``, ``0 <= W <= T``; 0 for ``warmup="none"``.
        warmup_start: the warmup's first LR, a number >= 0; None means ``base_lr``.
        decay: one of ``DECAY_KINDS``.
        milestones: ``step`` decay only: examples seen at which the LR drops
            by ``gamma``, strictly increasing, in ``(W, T]``.
        gamma: ``step`` decay factor in (0, 1].
        power: ``poly`` exponent (> 0).
        end_lr: final LR of ``poly``/``cosine``/``linear`` (an absolute LR, the
            same for every global batch; must not exceed the peak it decays from).
    """

    base_lr: float
    base_batch: int
    total_examples: int
    scaling: str = "linear"
    warmup: str = "gradual"
    warmup_examples: int = 0
    warmup_start: float | None = None
    decay: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 2.0
    end_lr: float = 0.0

    def __post_init__(self) -> None:
        set_field = functools.partial(object.__setattr__, self)  # the dataclass is frozen
        set_field("base_lr", check_non_negative("base_lr", self.base_lr))
        set_field("base_batch", check_positive_int("base_batch", self.base_batch))
        set_field("total_examples", check_positive_int("total_examples", self.total_examples))
        check_choice("scaling", self.scaling, SCALING_RULES)
        check_choice("warmup", self.warmup, WARMUP_KINDS)
        set_field("warmup_examples", _check_examples("warmup_examples", self.warmup_examples))
        if self.warmup_examples > self.total_examples:
            raise ValueError(
                f"warmup_examples={self.warmup_examples} is longer than training "
                f"(total_examples={self.total_examples}); allowed: 0 <= warmup_examples <= total_examples"
            )
        if self.warmup == "none" and self.warmup_examples:
            raise ValueError(f"warmup_examples must be 0 when warmup='none', got {self.warmup_examples}")
        if self.warmup_start is not None:
            set_field("warmup_start", check_non_negative("warmup_start", self.warmup_start))
        check_choice("decay", self.decay, DECAY_KINDS)
        for name, value in checked_decay_factors(self.gamma, self.power, self.end_lr).items():
            set_field(name, value)
        raw = self.milestones
        if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
            raise ValueError(f"milestones must be a sequence of example counts, got {raw!r}")
        raw = tuple(raw)
        if self.decay != "step":
            if raw:
                raise ValueError(
                    f"milestones are only used by decay='step', got milestones={raw!r} with decay={self.decay!r}"
                )
        elif not raw:
            raise ValueError("milestones must hold at least one milestone (in examples) for decay='step', got ()")
        values = tuple(_check_examples("milestones", m) for m in raw)
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {raw!r}")
        for value in values:
            if not self.warmup_examples < value <= self.total_examples:
                raise ValueError(
                    f"milestones must lie after the warmup and within training, i.e. in "
                    f"({self.warmup_examples}, {self.total_examples}] examples; got {value!r}"
                )
        set_field("milestones", values)

    # -- builders -----------------------------------------------------------
    @classmethod
    def from_epochs(
        cls,
        base_lr: float,
        base_batch: int,
        examples_per_epoch: int,
        epochs: Number,
        warmup_epochs: Number = 0,
        *,
        scaling: str = "linear",
        warmup: str = "gradual",
        warmup_start: float | None = None,
        decay: str = "constant",
        milestones: Iterable[Number] = (),
        gamma: float = 0.1,
        power: float = 2.0,
        end_lr: float = 0.0,
    ) -> ElasticSchedule:
        """The recipe with its lengths in epochs (``examples_per_epoch`` examples each, all workers together).

        Epoch counts are converted to examples, rounded to the nearest example.

        Raises:
            ValueError: naming the offending argument.

        Example:
            >>> s = ElasticSchedule.from_epochs(0.1, 256, 1000, epochs=10, warmup_epochs=0.5, decay="cosine")
            >>> s.total_examples, s.warmup_examples
            (10000, 500)
        """
        examples_per_epoch = check_positive_int("examples_per_epoch", examples_per_epoch)
        epochs = check_positive("epochs", epochs)
        warmup_epochs = check_non_negative("warmup_epochs", warmup_epochs)
        if warmup == "none" and warmup_epochs:
            raise ValueError(f"warmup_epochs must be 0 when warmup='none', got {warmup_epochs!r}")
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
            raise ValueError(f"milestones must be a sequence of epochs, got {milestones!r}")

        def examples(value: Number, name: str) -> int:
            return int(math.floor(check_non_negative(name, value) * examples_per_epoch + 0.5))

        return cls(
            base_lr=base_lr,
            base_batch=base_batch,
            total_examples=examples(epochs, "epochs"),
            scaling=scaling,
            warmup=warmup,
            warmup_examples=examples(warmup_epochs, "warmup_epochs"),
            warmup_start=warmup_start,
            decay=decay,
            milestones=tuple(examples(m, "milestones") for m in milestones),
            gamma=gamma,
            power=power,
            end_lr=end_lr,
        )

    @classmethod
    def from_schedule(
        cls,
        schedule: Schedule,
        *,
        global_batch: int | None,
        base_lr: float,
        base_batch: int,
        scaling: str = "linear",
    ) -> ElasticSchedule:
        """The elastic form of a step :class:`Schedule` built for ``global_batch``.

        Step ``t`` of ``schedule`` is taken to start after ``t * global_batch``
        examples; the peak must be the scaling rule's for that batch, so that
        it can be re-derived for another one.

        Args:
            schedule: the step schedule (e.g. :func:`~hvd_largebatch.schedules.goyal`).
            global_batch: the global batch ``schedule`` counts its steps in: the
                reference that turns steps into examples.
            base_lr, base_batch, scaling: the recipe's peak rule.

        Raises:
            ValueError: when the schedule cannot be rescaled: no ``global_batch``
                (a schedule in steps has no meaning in examples without it), a
                peak that is not ``scale_lr(base_lr, base_batch, global_batch,
                scaling)``, or a non-``Schedule``.

        Example:
            >>> from hvd_largebatch import schedules
            >>> step = schedules.goyal(0.1, 256, 1024, steps_per_epoch=10, epochs=90)
            >>> s = ElasticSchedule.from_schedule(step, global_batch=1024, base_lr=0.1, base_batch=256)
            >>> all(s.lr(t * 1024, 1024) == step(t) for t in range(step.total_steps + 1))
            True
            >>> s.milestones[0] == 30 * 10 * 1024, s.to_schedule(1024).milestones
            (True, (300, 600, 800))
        """
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a hvd_largebatch.schedules.Schedule, got {type(schedule).__name__}")
        if global_batch is None:
            raise ValueError(
                "schedule cannot be rescaled: its lengths are counted in steps and global_batch=None gives "
                "no batch reference to turn them into examples; pass the global batch the schedule was built for"
            )
        global_batch = check_positive_int("global_batch", global_batch)
        expected = scale_lr(base_lr, base_batch, global_batch, scaling)
        if not math.isclose(schedule.peak, expected, rel_tol=1e-12, abs_tol=0.0):
            raise ValueError(
                f"schedule cannot be rescaled: its peak {schedule.peak!r} is not the {scaling!r} scaling of "
                f"base_lr={base_lr!r} at base_batch={base_batch} for global_batch={global_batch} ({expected!r})"
            )
        if schedule.decay == "step":
            if schedule.milestone_unit == "epoch":
                milestones = tuple(
                    int(math.floor(m * schedule.steps_per_epoch * global_batch + 0.5)) for m in schedule.milestones
                )
            else:
                milestones = tuple(int(m) * global_batch for m in schedule.milestones)
        else:
            milestones = ()
        return cls(
            base_lr=base_lr,
            base_batch=base_batch,
            total_examples=schedule.total_steps * global_batch,
            scaling=scaling,
            warmup=schedule.warmup,
            warmup_examples=schedule.warmup_steps * global_batch,
            warmup_start=schedule.warmup_start,
            decay=schedule.decay,
            milestones=milestones,
            gamma=schedule.gamma,
            power=schedule.power,
            end_lr=schedule.end_lr,
        )

    # -- evaluation ---------------------------------------------------------
    def peak(self, global_batch: int) -> float:
        """``scale_lr(base_lr, base_batch, global_batch, scaling)``."""
        return scale_lr(self.base_lr, self.base_batch, global_batch, self.scaling)

    def lr(self, examples_seen: int, global_batch: int) -> float:
        """The LR of the update that starts after ``examples_seen`` examples, on a global batch of ``global_batch``.

        Raises:
            ValueError: naming ``examples_seen`` or ``global_batch``; naming
                ``end_lr`` when it exceeds the peak of ``global_batch``.
        """
        e = min(_check_examples("examples_seen", examples_seen), self.total_examples)
        peak = self.peak(global_batch)
        if e < self.warmup_examples:
            start = self.base_lr if self.warmup_start is None else self.warmup_start
            return WARMUPS[self.warmup].value(e, self.warmup_examples, start, peak)
        if self.decay == "constant":
            return peak
        if self.decay == "step":
            return step_decay(e, peak, self.milestones, self.gamma)
        if self.end_lr > peak:
            raise ValueError(
                f"end_lr={self.end_lr!r} exceeds the peak {peak!r} of global_batch={global_batch}; "
                f"allowed: end_lr <= peak for decay={self.decay!r}"
            )
        progress = decay_progress(e, self.warmup_examples, self.total_examples)
        if self.decay == "cosine":
            return cosine_decay(progress, peak, self.end_lr)
        return poly_decay(progress, peak, self.end_lr, 1.0 if self.decay == "linear" else self.power)

    def to_schedule(self, global_batch: int) -> Schedule:
        """The step :class:`Schedule` of this recipe at a constant ``global_batch`` (update ``t`` after ``t * B``).

        Raises:
            ValueError: naming ``global_batch`` when a length of the recipe
                (total, warmup, a milestone) is not a multiple of it, since
                the step schedule could then not agree with :meth:`lr`.
        """
        global_batch = check_positive_int("global_batch", global_batch)
        lengths = {"total_examples": self.total_examples, "warmup_examples": self.warmup_examples}
        lengths.update({f"milestones[{i}]": m for i, m in enumerate(self.milestones)})
        for name, value in lengths.items():
            if value % global_batch:
                raise ValueError(
                    f"global_batch={global_batch} does not divide {name}={value}; allowed: a divisor of every "
                    "length of the recipe (use lr(examples_seen, global_batch) otherwise)"
                )
        return Schedule(
            peak=self.peak(global_batch),
            total_steps=self.total_examples // global_batch,
            warmup=self.warmup,
            warmup_steps=self.warmup_examples // global_batch,
            warmup_start=None if self.warmup == "none" else (
                self.base_lr if self.warmup_start is None else self.warmup_start
            ),
            decay=self.decay,
            milestones=tuple(m // global_batch for m in self.milestones),
            milestone_unit="step",
            gamma=self.gamma,
            power=self.power,
            end_lr=self.end_lr,
        )

    # -- serialisation --------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Every field as a JSON-able dict; :meth:`from_config` inverts it exactly."""
        return config_of(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ElasticSchedule:
        """Rebuilds (and re-validates) a recipe from :meth:`to_config`'s dict.

        Raises:
            ValueError: naming ``config`` when it is not a mapping, or naming unknown keys or invalid fields.
        """
        return from_config_of(cls, config, required=("base_lr", "base_batch", "total_examples"))


def check_elastic_schedule(schedule: Any) -> ElasticSchedule:
    """Returns ``schedule`` if it is an :class:`ElasticSchedule`; the error both frameworks' elastic parts raise.

    Raises:
        ValueError: naming ``schedule``: a step :class:`Schedule` (lengths in
            updates of one global batch) cannot follow a change of global
            batch and must be converted with :meth:`ElasticSchedule.from_schedule`.
    """
    if not isinstance(schedule, ElasticSchedule):
        raise ValueError(
            "schedule must be a hvd_largebatch.schedules.ElasticSchedule (lengths in examples), got "
            f"{type(schedule).__name__}; a step Schedule cannot follow a change of global batch: convert it "
            "with ElasticSchedule.from_schedule(schedule, global_batch=..., base_lr=..., base_batch=...)"
        )
    return schedule


@dataclasses.dataclass(frozen=True)
class ElasticBatch:
    """The batch policy of elastic training: which of the per-worker and the global batch is kept on a change.

    Exactly one of ``per_worker_batch`` and ``global_batch`` is given:

    * ``per_worker_batch`` (kept): ``B = per_worker_batch * world_size * k``
      follows the world, and with it the recipe's peak LR;
    * ``global_batch`` (kept): the per-worker batch becomes
      ``B / (world_size * k)`` (a world size that does not divide it is
      refused), and the LR stays where the recipe is for ``B``;

    with ``k = backward_passes_per_step`` (local gradient accumulation).

    Raises:
        ValueError: naming the argument.

    Example:
        >>> ElasticBatch(per_worker_batch=32, backward_passes_per_step=2).for_world(4)
        (32, 256)
        >>> ElasticBatch(global_batch=256).for_world(2)
        (128, 256)
    """

    per_worker_batch: int | None = None
    global_batch: int | None = None
    backward_passes_per_step: int = 1

    def __post_init__(self) -> None:
        if (self.per_worker_batch is None) == (self.global_batch is None):
            raise ValueError(
                f"exactly one of per_worker_batch and global_batch must be given, got per_worker_batch="
                f"{self.per_worker_batch!r} and global_batch={self.global_batch!r}"
            )
        for name in ("per_worker_batch", "global_batch"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        object.__setattr__(
            self, "backward_passes_per_step", check_positive_int("backward_passes_per_step", self.backward_passes_per_step)
        )

    def for_world(self, world_size: int) -> tuple[int, int]:
        """``(per_worker_batch, global_batch)`` on ``world_size`` workers (per-worker: per backward pass).

        Raises:
            ValueError: naming ``world_size``, or ``global_batch`` when the
                workers cannot share it equally.
        """
        world_size = check_positive_int("world_size", world_size)
        k = self.backward_passes_per_step
        if self.global_batch is not None:
            return per_worker_batch_size(self.global_batch, world_size, k), self.global_batch
        return self.per_worker_batch, self.per_worker_batch * world_size * k
