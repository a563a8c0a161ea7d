"""``make_schedule``: a validated :class:`Schedule` from the user's terms (scaling rule, warmup, decay)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Union

from hvd_largebatch.config import check_choice, check_non_negative
from hvd_largebatch.schedules.batch import per_worker_batch_size
from hvd_largebatch.schedules.record import Schedule
from hvd_largebatch.schedules.scaling import SCALING_RULES, scale_lr
from hvd_largebatch.schedules.warmup import WARMUP_KINDS, warmup_start_lr

__all__ = ["make_schedule"]

Number = Union[int, float]


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
        world_size: number of workers, for ``warmup_start="peak/world_size"``;
            when given with ``global_batch``, the global batch must divide
            evenly over the workers (as :func:`per_worker_batch_size`).
        decay: one of ``DECAY_KINDS`` (the pieces of :data:`~hvd_largebatch.schedules.decay.DECAYS`).
        milestones: ``step`` decay milestones, in ``milestone_unit`` units.
        milestone_unit: ``"epoch"`` (needs ``steps_per_epoch``) or ``"step"``.
        steps_per_epoch: ``S``; needed for epoch milestones, kept as metadata otherwise.
        gamma: ``step`` decay factor in (0, 1].
        power: ``poly`` exponent (> 0).
        end_lr: final LR of ``poly``, ``cosine`` and ``linear``.

    Raises:
        ValueError: naming the offending argument and its allowed values;
            naming ``global_batch`` when it is not a multiple of ``world_size``;
            naming ``global_batch`` and ``base_batch`` when a global batch below
            the base batch puts the scaled peak below the warmup start, and
            ``warmup_start`` and ``peak`` for any other warmup start above the
            peak (a warmup never lowers the LR; without warmup a scaled-down LR is fine).

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
    if world_size is not None and global_batch is not None:
        per_worker_batch_size(global_batch, world_size)  # the same refusal (and message) as for the per-worker batch
    start = warmup_start_lr(warmup, warmup_start, base_lr, peak, world_size)
    warming = isinstance(warmup_steps, int) and warmup_steps > 0
    if start is not None and warming and start > peak and global_batch is not None and global_batch < base_batch:
        raise ValueError(
            f"global_batch={global_batch} is below base_batch={base_batch}, so the scaled peak LR {peak:g} is below "
            f"the warmup start {start:g} and the warmup would lower the LR (a warm-down); allowed: "
            "global_batch >= base_batch, or no warmup (warmup_steps=0; warmup_epochs=0 in goyal and lars_poly) to "
            "train at the scaled-down LR, or a "
            "warmup_start <= the peak"
        )
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
