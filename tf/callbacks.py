"""Keras 3 callbacks for Horovod training: broadcast, metric averaging, per-batch LR from a core schedule.

Replaces ``horovod.tensorflow.keras.callbacks``, which uses ``optimizer.lr``
(gone in Keras 3). Only ``horovod.tensorflow`` ops are used.

* :class:`BroadcastGlobalVariablesCallback`: at the start of ``fit``, rank 0's
  model weights (trainable and not) and optimizer variables go to every rank.
* :class:`MetricAverageCallback`: epoch-end metrics averaged over ranks.
* :class:`LearningRateScheduleCallback`: sets the LR before every batch from
  a core :class:`hvd_largebatch.schedules.Schedule`, with momentum correction.
* :class:`GradualWarmupCallback`: the same for Goyal's gradual-warmup recipes.
* :class:`SkippedStepsLogger`: the optimizer's count of steps skipped for
  non-finite gradients, in the batch and epoch logs (``"skipped_steps"``),
  with a warning on rank 0 when it grows.
* :class:`~hvd_largebatch.tf.batchnorm_statistics.AverageBatchNormStatistics`
  (in :mod:`hvd_largebatch.tf.batchnorm_statistics`): BatchNorm moving
  statistics averaged over ranks after each epoch's last batch.

LR ownership: the LR callbacks own the optimizer's LR but compose with
anything else that changes it between batches (``ReduceLROnPlateau``, a user's
``optimizer.learning_rate = ...``): such a change becomes a factor,
``lr_multiplier``, on the schedule from then on (see
:class:`LearningRateScheduleCallback`).

Order matters as in Horovod: put :class:`MetricAverageCallback` and the LR
callbacks before callbacks that read the logs (``TensorBoard``,
``ModelCheckpoint``, ``CSVLogger``); Keras adds its ``History`` and progress
bar after all of yours.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from hvd_largebatch import config, schedules
from hvd_largebatch.tf import horovod_backend
from hvd_largebatch.tf.distributed import find_distributed_optimizer, innermost_optimizer
from hvd_largebatch.tf.large_batch_optimizer import LargeBatchOptimizer
from hvd_largebatch.tf.schedule_adapter import ScheduleAdapter

__all__ = [
    "BroadcastGlobalVariablesCallback",
    "MetricAverageCallback",
    "LearningRateScheduleCallback",
    "GradualWarmupCallback",
    "SkippedStepsLogger",
    "ScheduleAdapter",
    "LOG_KEY",
    "SKIPPED_STEPS_KEY",
]

#: The key under which the LR callbacks put the current LR in the batch and epoch logs.
LOG_KEY = "learning_rate"
#: The key under which :class:`SkippedStepsLogger` puts the skipped-step count in the batch and epoch logs.
SKIPPED_STEPS_KEY = "skipped_steps"


def _is_rank_zero() -> bool:
    """True on Horovod's rank 0, and in a process where Horovod is not running."""
    if not horovod_backend.horovod_is_running():
        return True
    return horovod_backend.initialized_horovod().rank() == 0


def _read_lr(optimizer: Any) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _check_root_rank(root_rank: Any) -> int:
    return config.check_non_negative_int("root_rank", root_rank)


def _refuse_jit_with_horovod(model: keras.Model) -> None:
    """Refuses ``jit_compile=True`` before the first step when a DistributedOptimizer is used."""
    if find_distributed_optimizer(getattr(model, "optimizer", None)) is not None and model.jit_compile is True:
        raise ValueError(
            "jit_compile=True cannot be used with hvd_largebatch.tf.DistributedOptimizer: Horovod's allreduce "
            "has no XLA kernel. Compile the model with model.compile(..., jit_compile=False)."
        )


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Broadcasts rank ``root_rank``'s model and optimizer variables to all ranks when ``fit`` starts.

    Broadcasts ``model.variables`` (weights, BatchNorm statistics, ...) and
    ``optimizer.variables`` (slots, iteration count, learning rate, the
    package's ``prev_learning_rate`` and ``skipped_steps``), so that every
    rank starts, or resumes from a checkpoint loaded on every rank, in
    exactly rank 0's state. Keras creates optimizer variables lazily; this
    callback builds the optimizer on the model's trainable variables first if
    ``fit`` has not already. It also refuses ``jit_compile=True`` with a
    ``DistributedOptimizer`` before the first step.

    Args:
        root_rank: the rank whose values everyone receives.
    """

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = _check_root_rank(root_rank)
        self.broadcast_done = False

    def on_train_begin(self, logs=None):
        hvd = horovod_backend.initialized_horovod()
        if self.root_rank >= hvd.size():
            raise ValueError(f"root_rank must be < the number of ranks ({hvd.size()}), got {self.root_rank}")
        model = self.model
        _refuse_jit_with_horovod(model)
        optimizer = model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)
        variables = list(model.variables) + (list(optimizer.variables) if optimizer is not None else [])
        hvd.broadcast_variables([v.value if isinstance(v, keras.Variable) else v for v in variables], self.root_rank)
        self.broadcast_done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Replaces every numeric epoch-end log value by its average over all ranks.

    All values go in one allreduce (keys in sorted order, the same on every
    rank), so metrics such as ``loss``, ``accuracy`` and ``val_loss`` become
    the same on every rank, and equal to the global metric when the ranks
    hold equal numbers of examples.
    """

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        hvd = horovod_backend.initialized_horovod()
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float, np.floating, np.integer)))
        if not keys:
            return
        values = np.array([float(logs[k]) for k in keys], dtype=np.float64)
        averaged = hvd.allreduce(values, op=hvd.Average, name="hvd_largebatch_metric_average").numpy()
        for key, value in zip(keys, averaged):
            logs[key] = float(value)


def _velocity_slots(optimizer: Any) -> list[Any] | None:
    """The velocities that hold the LR and need momentum correction by the callback, or None.

    Keras's SGD keeps ``m = momentum * m - lr * g``: the LR is inside its
    velocity, so a changing LR needs correction. Optimizers without such a
    velocity (Adam, Lamb, ...) need none.
    """
    if isinstance(optimizer, keras.optimizers.SGD) and optimizer.momentum:
        return list(optimizer.momentums)
    return None


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Sets the LR before every batch to ``lr_multiplier * schedule(optimizer.iterations)``.

    The step is the optimizer's update count, so the LR follows the schedule
    through resumed runs and through ``backward_passes_per_step`` (one update
    per ``k`` batches). The LR is written into the batch and epoch logs under
    ``"learning_rate"``, where ``History``, ``CSVLogger`` and ``TensorBoard``
    find it.

    LR ownership: the callback remembers the LR it set. When the optimizer's
    LR differs from it at the next batch (``ReduceLROnPlateau`` reduced it at
    the end of an epoch, or the user assigned ``optimizer.learning_rate``),
    the change is kept as a factor on the schedule::

        lr_multiplier <- lr_multiplier * lr_found / lr_set
        lr(t)          = lr_multiplier * schedule(t)

    so ``ReduceLROnPlateau(factor=0.5)`` halves the LR for the rest of the
    schedule (warmup and decay keep their shape). The multiplier lives in the
    callback: a run resumed from a checkpoint with a new callback passes the
    saved factor as ``lr_multiplier``. A change made while the schedule's LR
    was 0 cannot be expressed as a factor: it is overridden, with a warning.
    Training past ``schedule.total_steps`` keeps the schedule's final LR and
    warns once (on rank 0): ``total_steps`` counts optimizer updates, so an
    epoch with more batches than ``steps_per_epoch`` runs off the end.

    Momentum correction (Goyal et al. 2017, section 2.2): when the LR changes
    from ``gamma_prev`` to ``gamma_t``, a velocity that holds the LR is
    rescaled by ``gamma_t / gamma_prev``. The package's SGD, LARS and CLARS do
    this themselves from their recorded previous LR (their own
    ``momentum_correction`` decides, and must agree with this callback's);
    for ``keras.optimizers.SGD`` with momentum this callback rescales its
    momentum slots, from the LR it last set; other optimizers (Adam, LAMB, ...)
    have no such velocity.

    Args:
        schedule: a core :class:`~hvd_largebatch.schedules.Schedule`.
        momentum_correction: apply momentum correction (see above).
        verbose: 0 silent; 1 prints the LR at each epoch start, and the new
            ``lr_multiplier`` when a change from elsewhere is composed.
        lr_multiplier: the initial factor on the schedule (> 0, default 1).

    Raises:
        ValueError: naming the argument for bad input; at ``fit`` start, when
            the optimizer's LR is itself a schedule (it cannot be set), when
            ``steps_per_execution > 1`` (the LR could not change per batch),
            or when a package optimizer's ``momentum_correction`` disagrees.
    """

    def __init__(
        self,
        schedule: schedules.Schedule,
        momentum_correction: bool = True,
        verbose: int = 0,
        lr_multiplier: float = 1.0,
    ):
        super().__init__()
        if not isinstance(schedule, schedules.Schedule):
            raise ValueError(f"schedule must be an hvd_largebatch.schedules.Schedule, got {schedule!r}")
        self.schedule = schedule
        self.momentum_correction = config.check_bool("momentum_correction", momentum_correction)
        self.verbose = config.check_choice("verbose", verbose, (0, 1, 2))
        self.lr_multiplier = config.check_positive("lr_multiplier", lr_multiplier)
        self.current_lr: float | None = None
        self._slots: list[Any] | None = None
        self._driven_optimizer: Any = None  # the optimizer whose LR was last set
        self._lr_set: float | None = None  # the LR read back right after the last set
        self._warned_past_end = False

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        if optimizer is not self._driven_optimizer:  # a new optimizer: nothing it holds was set by us
            self._driven_optimizer, self._lr_set = optimizer, None
        if not optimizer.built:  # Keras builds optimizers lazily; the slots must exist to be corrected
            optimizer.build(self.model.trainable_variables)
        inner = innermost_optimizer(optimizer)
        if callable(getattr(inner, "_learning_rate", None)):
            raise ValueError(
                f"{type(self).__name__} sets the LR every batch, but the optimizer's learning_rate is a schedule "
                "or a callable; create the optimizer with a float learning_rate (or use ScheduleAdapter alone)"
            )
        if getattr(self.model, "steps_per_execution", 1) != 1:
            raise ValueError(
                f"{type(self).__name__} sets the LR before every batch; compile with steps_per_execution=1 "
                "(or use ScheduleAdapter, which runs inside the graph)"
            )
        if isinstance(inner, LargeBatchOptimizer) and hasattr(inner.core_config, "momentum_correction"):
            if inner.core_config.momentum_correction != self.momentum_correction:
                raise ValueError(
                    f"momentum_correction={self.momentum_correction} disagrees with the optimizer's "
                    f"momentum_correction={inner.core_config.momentum_correction}; {inner.name} corrects its own "
                    "velocity, so set both the same"
                )
            self._slots = None
        else:
            self._slots = _velocity_slots(inner) if self.momentum_correction else None

    def _compose_outside_change(self, found_lr: float) -> None:
        """Turns a change of the LR made since the last batch into a factor on the schedule."""
        if self._lr_set is None or found_lr == self._lr_set:
            return
        if self._lr_set > 0.0:
            self.lr_multiplier *= found_lr / self._lr_set
            if self.verbose:
                print(
                    f"{type(self).__name__}: the learning rate was changed from {self._lr_set:.6g} to "
                    f"{found_lr:.6g} since the last batch; lr_multiplier = {self.lr_multiplier:.6g}"
                )
        elif _is_rank_zero():
            warnings.warn(
                f"{type(self).__name__}: the learning rate was changed to {found_lr:.6g} while the schedule's "
                "was 0; a change from 0 is no factor on the schedule, so the schedule's value is set again",
                stacklevel=2,
            )

    def _warn_past_end(self, step: int) -> None:
        if self._warned_past_end or step < self.schedule.total_steps:
            return
        self._warned_past_end = True
        if _is_rank_zero():
            warnings.warn(
                f"{type(self).__name__}: optimizer step {step} is past the schedule's total_steps="
                f"{self.schedule.total_steps}; the LR stays at the schedule's final value "
                f"{self.schedule(self.schedule.total_steps):.6g} (times lr_multiplier). total_steps counts optimizer "
                "updates: check the schedule's steps_per_epoch and epochs against the batches per epoch",
                stacklevel=2,
            )

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        step = int(keras.ops.convert_to_numpy(optimizer.iterations))
        found_lr = _read_lr(optimizer)
        self._compose_outside_change(found_lr)
        self._warn_past_end(step)
        new_lr = self.lr_multiplier * float(self.schedule(step))
        if self._slots is not None:
            # The velocity holds the LR of the last step: the one this callback set, if it set one.
            prev_lr = self._lr_set if self._lr_set is not None else found_lr
            factor = schedules.momentum_correction(prev_lr, new_lr)
            if factor != 1.0:
                for slot in self._slots:
                    if slot is not None:
                        slot.assign(slot * factor)
        optimizer.learning_rate = new_lr
        self._driven_optimizer = optimizer
        self._lr_set = _read_lr(optimizer)
        self.current_lr = new_lr

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None and self.current_lr is not None:
            logs[LOG_KEY] = self.current_lr

    def on_epoch_begin(self, epoch, logs=None):
        if self.verbose:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            lr = self.lr_multiplier * self.schedule(step)
            print(f"Epoch {epoch + 1}: {type(self).__name__} learning rate = {lr:.6g} (step {step})")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.current_lr is not None:
            logs[LOG_KEY] = self.current_lr


class GradualWarmupCallback(LearningRateScheduleCallback):
    """Goyal's gradual warmup (and the decay after it), the LR set per batch from a core schedule.

    Goyal et al. (2017), section 2.2: for the first ``W`` updates the LR rises
    linearly per iteration, ``lr(t) = start + (peak - start) * t / W``, from
    ``start`` (Goyal: the base LR; Horovod: ``peak / world_size``) to the
    linearly scaled ``peak``, with momentum correction at every change; then
    the schedule's decay. This is :class:`LearningRateScheduleCallback` with a
    schedule that must have a gradual warmup.

    Args:
        schedule_or_args: a :class:`~hvd_largebatch.schedules.Schedule` with
            ``warmup="gradual"`` (e.g. from :func:`hvd_largebatch.schedules.goyal`),
            or a mapping of :func:`hvd_largebatch.schedules.make_schedule`
            arguments (``base_lr``, ``total_steps``, ``warmup_steps``, ...).
        momentum_correction: as :class:`LearningRateScheduleCallback`.
        verbose: 0 silent; 1 prints the LR at each epoch start and when the warmup ends.
        lr_multiplier: as :class:`LearningRateScheduleCallback` (a factor on
            the schedule, which ``ReduceLROnPlateau`` and other changes of the
            LR made between batches update).

    Example:
        >>> from hvd_largebatch import schedules
        >>> from hvd_largebatch.tf.callbacks import GradualWarmupCallback
        >>> sched = schedules.goyal(0.1, 256, 1024, steps_per_epoch=50, epochs=10, warmup_epochs=2,
        ...                         milestones=(5, 8))
        >>> callback = GradualWarmupCallback(sched)
        >>> callback.schedule.warmup_steps, callback.schedule(100)
        (100, 0.4)
    """

    def __init__(
        self,
        schedule_or_args: schedules.Schedule | Mapping[str, Any],
        momentum_correction: bool = True,
        verbose: int = 0,
        lr_multiplier: float = 1.0,
    ):
        if isinstance(schedule_or_args, Mapping):
            schedule = schedules.make_schedule(**schedule_or_args)
        elif isinstance(schedule_or_args, schedules.Schedule):
            schedule = schedule_or_args
        else:
            raise ValueError(
                "schedule_or_args must be an hvd_largebatch.schedules.Schedule or a mapping of "
                f"make_schedule arguments, got {schedule_or_args!r}"
            )
        if schedule.warmup != "gradual" or schedule.warmup_steps == 0:
            raise ValueError(
                "schedule_or_args must describe a gradual warmup (warmup='gradual', warmup_steps > 0), got "
                f"warmup={schedule.warmup!r}, warmup_steps={schedule.warmup_steps}; "
                "use LearningRateScheduleCallback for other schedules"
            )
        super().__init__(schedule, momentum_correction=momentum_correction, verbose=verbose, lr_multiplier=lr_multiplier)

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        if self.verbose:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            if step == self.schedule.warmup_steps:
                print(f"GradualWarmupCallback: warmup done at step {step}, learning rate = {self.current_lr:.6g}")


class SkippedStepsLogger(keras.callbacks.Callback):
    """Puts the optimizer's count of skipped non-finite steps into the logs, and warns on rank 0 when it grows.

    The package's optimizers skip a step whose (averaged) gradients hold NaN
    or Inf (``nonfinite="skip"``): no weight or slot changes, and the
    optimizer's ``skipped_steps`` variable counts it. This callback writes that
    count, cumulative since the optimizer was created, under
    ``"skipped_steps"`` into every batch's and epoch's logs, where
    ``History``, ``CSVLogger`` and ``TensorBoard`` (``epoch_skipped_steps``,
    and ``batch_skipped_steps`` with ``update_freq="batch"``) find it: put it
    before those callbacks. On rank 0 it warns (``RuntimeWarning``) at the
    first skip and then at every ``warn_every``-th, as the PyTorch optimizers
    do. Every rank holds the same count (the skip decision is taken on
    gradients averaged over the ranks).

    Args:
        warn_every: warn at the first skip and then every this-many-th (>= 1).

    Raises:
        ValueError: a bad ``warn_every``; at ``fit`` start, an optimizer that
            is not one of the package's (``SGD``, ``LARS``, ``CLARS``,
            ``LAMB``, possibly inside ``DistributedOptimizer``).

    Example:
        >>> from hvd_largebatch.tf.callbacks import SkippedStepsLogger
        >>> SkippedStepsLogger(warn_every=500).warn_every
        500
    """

    def __init__(self, warn_every: int = 100):
        super().__init__()
        self.warn_every = config.check_positive_int("warn_every", warn_every)
        self.skipped_steps = 0
        self._optimizer: Any = None

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        inner = innermost_optimizer(optimizer)
        if not isinstance(inner, LargeBatchOptimizer):
            raise ValueError(
                "SkippedStepsLogger reads the skipped_steps counter of the package's optimizers (SGD, LARS, CLARS, "
                f"LAMB, possibly inside DistributedOptimizer); the model's optimizer is {type(inner).__name__}"
            )
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self._optimizer = inner
        self.skipped_steps = int(keras.ops.convert_to_numpy(inner.skipped_steps))

    def _update(self, logs) -> tuple[int, int]:
        before = self.skipped_steps
        self.skipped_steps = int(keras.ops.convert_to_numpy(self._optimizer.skipped_steps))
        if logs is not None:
            logs[SKIPPED_STEPS_KEY] = self.skipped_steps
        return before, self.skipped_steps

    def on_train_batch_end(self, batch, logs=None):
        before, count = self._update(logs)
        crossed = (before < 1 <= count) or count // self.warn_every > before // self.warn_every
        if count > before and crossed and _is_rank_zero():
            warnings.warn(
                f"{type(self._optimizer).__name__}: skipped an update because a gradient holds NaN or Inf (weights "
                f"and optimizer state untouched); {count} update(s) skipped so far (skipped_steps in the logs). "
                f"Warned at the first skip and every {self.warn_every}th; pass nonfinite='raise' to stop instead",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_epoch_end(self, epoch, logs=None):
        self._update(logs)
