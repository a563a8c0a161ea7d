"""``ScheduleAdapter``: a core :class:`hvd_largebatch.schedules.Schedule` as a Keras ``LearningRateSchedule``.

For users who prefer the LR inside the graph to a per-batch callback. The
adapter evaluates the core schedule once per step ``0..T`` when it is created
and looks the value up in the traced step (``lr(t)`` for ``t >= T`` is
``lr(T)``), so every LR the optimizer sees is exactly the core schedule's
value, rounded to the dtype of the optimizer's computation.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from hvd_largebatch import config
from hvd_largebatch.schedules import Schedule

__all__ = ["ScheduleAdapter"]

#: Refuse tables larger than this (16M steps is 128 MB in float64).
_MAX_TABLE_STEPS = 1 << 24


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class ScheduleAdapter(keras.optimizers.schedules.LearningRateSchedule):
    """A Keras ``LearningRateSchedule`` whose value at step ``t`` is ``schedule(t)``.

    Keras calls it with ``optimizer.iterations``, which counts updates from 0
    like the core schedule. Serialisable: ``get_config()`` holds
    ``schedule.to_config()``.

    Args:
        schedule: a core :class:`~hvd_largebatch.schedules.Schedule`.
        dtype: dtype of the returned LR (default ``keras.backend.floatx()`` at call time).

    Note:
        Momentum correction is not the schedule's business: the package's
        optimizers apply it themselves from their recorded previous LR, for
        any LR source. Keras's own SGD gets none with an in-graph schedule;
        use :class:`~hvd_largebatch.tf.callbacks.GradualWarmupCallback` for it.

    Example:
        >>> from hvd_largebatch import schedules
        >>> from hvd_largebatch.tf import LARS, ScheduleAdapter
        >>> sched = schedules.make_schedule(0.1, 100, peak=0.4, warmup_steps=10)
        >>> lr = ScheduleAdapter(sched)
        >>> round(float(lr(5)), 6), round(float(lr(500)), 6)
        (0.25, 0.4)
        >>> opt = LARS(learning_rate=lr)
    """

    def __init__(self, schedule: Schedule, dtype: str | None = None):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be an hvd_largebatch.schedules.Schedule, got {schedule!r}")
        if schedule.total_steps >= _MAX_TABLE_STEPS:
            raise ValueError(f"schedule.total_steps must be < {_MAX_TABLE_STEPS}, got {schedule.total_steps}")
        if dtype is not None:
            config.check_choice("dtype", dtype, ("float16", "bfloat16", "float32", "float64"))
        self.schedule = schedule
        self.dtype = dtype
        self._table = np.array([schedule(t) for t in range(schedule.total_steps + 1)], dtype=np.float64)
        self._tensors: dict[str, Any] = {}

    def _table_tensor(self, dtype: str) -> Any:
        """The table as a constant of ``dtype``, made once (outside any graph being traced) and reused."""
        if dtype not in self._tensors:
            with tf.init_scope():
                self._tensors[dtype] = tf.constant(self._table, dtype=dtype)
        return self._tensors[dtype]

    def __call__(self, step: Any) -> Any:
        dtype = self.dtype or keras.backend.floatx()
        index = ops.clip(ops.cast(step, "int64"), 0, self.schedule.total_steps)
        return ops.take(self._table_tensor(dtype), index)

    def get_config(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_config(), "dtype": self.dtype}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScheduleAdapter:
        return cls(Schedule.from_config(config["schedule"]), dtype=config.get("dtype"))
