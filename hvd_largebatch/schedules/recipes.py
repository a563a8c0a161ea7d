"""The large-batch papers' schedules built from the pieces: Goyal et al.'s and the LARS paper's."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Union

from hvd_largebatch.config import check_non_negative, check_positive, check_positive_int
from hvd_largebatch.schedules.batch import epochs_to_steps
from hvd_largebatch.schedules.builder import make_schedule
from hvd_largebatch.schedules.record import Schedule

__all__ = ["GOYAL_EPOCHS", "GOYAL_WARMUP_EPOCHS", "GOYAL_MILESTONES", "goyal_warmup_epochs", "goyal_milestones",
           "goyal", "lars_poly"]

Number = Union[int, float]

#: Length of Goyal et al.'s ImageNet recipe, in epochs; its warmup and milestones below are in its epochs.
GOYAL_EPOCHS = 90
#: Goyal et al.'s warmup length (epochs of the 90-epoch recipe).
GOYAL_WARMUP_EPOCHS = 5
#: Goyal et al.'s step-decay milestones (epochs of the 90-epoch recipe).
GOYAL_MILESTONES = (30, 60, 80)


def goyal_warmup_epochs(epochs: Number) -> float:
    """The default warmup of a run of ``epochs``: Goyal's 5 epochs, or 5/90 of a shorter run.

    ``min(5, epochs * 5 / 90)``: a run of 90 epochs or more warms up for Goyal's
    5 epochs; a shorter run warms up for the same fraction of itself (1/18), so
    a 3-epoch run gets 1/6 of an epoch instead of a warmup longer than training.

    Raises:
        ValueError: naming ``epochs`` unless it is a finite number > 0.

    Example:
        >>> goyal_warmup_epochs(90), goyal_warmup_epochs(200), goyal_warmup_epochs(9)
        (5, 5, 0.5)
    """
    epochs = check_positive("epochs", epochs)
    if epochs >= GOYAL_EPOCHS:
        return GOYAL_WARMUP_EPOCHS
    return epochs * GOYAL_WARMUP_EPOCHS / GOYAL_EPOCHS


def goyal_milestones(epochs: Number, after: Number = 0) -> tuple[Number, ...]:
    """Goyal's milestones (epochs 30, 60, 80 of 90) as the same fractions of a run of ``epochs``.

    ``epochs * m / 90`` for ``m`` in 30, 60, 80 (integral values become ints),
    keeping only those later than ``after`` (the warmup, in epochs): a
    milestone must take effect after the warmup.

    Raises:
        ValueError: naming ``epochs`` unless it is a finite number > 0.

    Example:
        >>> goyal_milestones(90), goyal_milestones(9), goyal_milestones(45, after=20)
        ((30, 60, 80), (3, 6, 8), (30, 40))
    """
    epochs = check_positive("epochs", epochs)
    values = (epochs * m / GOYAL_EPOCHS for m in GOYAL_MILESTONES)
    return tuple(int(v) if float(v).is_integer() else v for v in values if v > after)


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
    epochs: Number,
    warmup_epochs: Number | None = None,
    milestones: Iterable[Number] | None = None,
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
    start of training) passed by ``t / steps_per_epoch``. ``epochs`` has no
    default (the paper's 90 suits ImageNet, not every run); the warmup and the
    milestones default to the paper's scaled to ``epochs``
    (:func:`goyal_warmup_epochs`, :func:`goyal_milestones`), so
    ``epochs=90`` gives the paper's recipe: 5 warmup epochs, x0.1 at epochs
    30, 60, 80.

    Args:
        base_lr: LR at ``base_batch`` (paper: 0.1 at 256).
        base_batch: reference batch.
        global_batch: batch of one update over all workers.
        steps_per_epoch: updates per epoch (see :func:`steps_per_epoch`).
        epochs: training length; fractional epochs round to the nearest step.
        warmup_epochs: warmup length (<= epochs); 0 disables the warmup.
            Default: ``min(5, epochs / 18)``.
        milestones: step-decay epochs, increasing, after the warmup, within training.
            Default: ``epochs`` x (1/3, 2/3, 8/9), those after the warmup.
        gamma: decay factor per milestone.
        warmup_start: see :func:`make_schedule` (default ``base_lr``, the paper's).
        world_size: workers, for ``warmup_start="peak/world_size"``; when
            given, ``global_batch`` must be a multiple of it.

    Raises:
        ValueError: naming the offending argument; naming ``global_batch``
            when it is not a multiple of ``world_size``, or when it is below
            ``base_batch`` with a warmup (the warmup would lower the LR; use
            ``warmup_epochs=0`` to train at the scaled-down LR).

    Example:
        >>> s = goyal(0.1, 256, 8192, steps_per_epoch=156, epochs=90)
        >>> round(s(1), 6), round(s(779), 6), s(780)
        (0.103974, 3.196026, 3.2)
        >>> goyal(0.1, 256, 8192, steps_per_epoch=156, epochs=9).describe()
        'gradual warmup over 78 steps from 0.1 to peak 3.2, then step decay x0.1 at epochs 3, 6, 8; 1404 steps'
    """
    if warmup_epochs is None:
        warmup_epochs = goyal_warmup_epochs(epochs)
    total, warm = _epoch_budget(epochs, warmup_epochs, steps_per_epoch)
    if milestones is None:
        milestones = goyal_milestones(epochs, after=warm / steps_per_epoch)
        if not milestones:
            raise ValueError(
                f"milestones: the default ones (epochs x 1/3, 2/3, 8/9) all lie within the warmup "
                f"(warmup_epochs={warmup_epochs:g} of epochs={epochs:g}); pass milestones explicitly"
            )
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
        world_size: workers, for ``warmup_start="peak/world_size"``; when
            given, ``global_batch`` must be a multiple of it.

    Raises:
        ValueError: naming the offending argument, as :func:`goyal`.

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
