"""Keras 3 callbacks for Horovod training: broadcast, metric averaging, per-batch LR from a core schedule.

Replaces ``horovod.tensorflow.keras.callbacks``, which uses ``optimizer.lr``
(gone in Keras 3). Only ``horovod.tensorflow`` ops are used.

* :class:`BroadcastGlobalVariablesCallback`: at the start of ``fit``, rank 0's
  model weights (trainable and not) and optimizer variables go to every rank.
* :class:`MetricAverageCallback`: epoch-end metrics averaged over ranks.
* :class:`LearningRateScheduleCallback`: sets the LR before every batch from
  a core :class:`hvd_largebatch.schedules.Schedule`, with momentum correction.
* :class:`GradualWarmupCallback`: the same for Goyal's gradual-warmup recipes.

Order matters as in Horovod: put :class:`MetricAverageCallback` and the LR
callbacks before callbacks that read the logs (``TensorBoard``,
``ModelCheckpoint``, ``CSVLogger``); Keras adds its ``History`` and progress
bar after all of yours.
"""

from __future__ import annotations

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
    "ScheduleAdapter",
    "LOG_KEY",
]

#: The key under which the LR callbacks put the current LR in the batch and epoch logs.
LOG_KEY = "learning_rate"


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
    """Sets the LR before every batch to ``schedule(optimizer.iterations)``.

    The step is the optimizer's update count, so the LR follows the schedule
    through resumed runs and through ``backward_passes_per_step`` (one update
    per ``k`` batches). The LR is written into the batch and epoch logs under
    ``"learning_rate"``, where ``History``, ``CSVLogger`` and ``TensorBoard``
    find it.

    Momentum correction (Goyal et al. 2017, section 2.2): when the LR changes
    from ``gamma_prev`` to ``gamma_t``, a velocity that holds the LR is
    rescaled by ``gamma_t / gamma_prev``. The package's SGD, LARS and CLARS do
    this themselves from their recorded previous LR (their own
    ``momentum_correction`` decides, and must agree with this callback's);
    for ``keras.optimizers.SGD`` with momentum this callback rescales its
    momentum slots; other optimizers (Adam, LAMB, ...) have no such velocity.

    Args:
        schedule: a core :class:`~hvd_largebatch.schedules.Schedule`.
        momentum_correction: apply momentum correction (see above).
        verbose: 0 silent; 1 prints the LR at each epoch start.

    Raises:
        ValueError: naming the argument for bad input; at ``fit`` start, when
            the optimizer's LR is itself a schedule (it cannot be set), when
            ``steps_per_execution > 1`` (the LR could not change per batch),
            or when a package optimizer's ``momentum_correction`` disagrees.
    """

    def __init__(self, schedule: schedules.Schedule, momentum_correction: bool = True, verbose: int = 0):
        super().__init__()
        if not isinstance(schedule, schedules.Schedule):
            raise ValueError(f"schedule must be an hvd_largebatch.schedules.Schedule, got {schedule!r}")
        self.schedule = schedule
        self.momentum_correction = config.check_bool("momentum_correction", momentum_correction)
        self.verbose = config.check_choice("verbose", verbose, (0, 1, 2))
        self.current_lr: float | None = None
        self._slots: list[Any] | None = None

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
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

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        new_lr = float(self.schedule(int(keras.ops.convert_to_numpy(optimizer.iterations))))
        if self._slots is not None:
            prev_lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            factor = schedules.momentum_correction(prev_lr, new_lr)
            if factor != 1.0:
                for slot in self._slots:
                    if slot is not None:
                        slot.assign(slot * factor)
        optimizer.learning_rate = new_lr
        self.current_lr = new_lr

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None and self.current_lr is not None:
            logs[LOG_KEY] = self.current_lr

    def on_epoch_begin(self, epoch, logs=None):
        if self.verbose:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            print(f"Epoch {epoch + 1}: {type(self).__name__} learning rate = {self.schedule(step):.6g} (step {step})")

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
        super().__init__(schedule, momentum_correction=momentum_correction, verbose=verbose)

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        if self.verbose:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            if step == self.schedule.warmup_steps:
                print(f"GradualWarmupCallback: warmup done at step {step}, learning rate = {self.current_lr:.6g}")
