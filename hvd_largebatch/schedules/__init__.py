"""Learning-rate scaling and schedules for large-batch training, as pure functions of the step.

This package implements the "Schedules" section of the math contract
(docs/algorithms.md) from small composable pieces, one module each:

* :mod:`.batch`: batch arithmetic (global batch, per-worker batch, steps per epoch);
* :mod:`.scaling`: the LR scaling rules (``linear``, ``sqrt``, ``none``);
* :mod:`.warmup`: the warmup pieces (Goyal's gradual ramp, constant);
* :mod:`.decay`: the decay pieces (step, poly, cosine, linear, constant), one
  table entry per kind;
* :mod:`.record`: :class:`Schedule`, the immutable, serialisable join of a
  warmup piece and a decay piece at step ``W``;
* :mod:`.builder`: :func:`make_schedule`, the schedule from the user's terms;
* :mod:`.recipes`: the papers' schedules :func:`goyal` and :func:`lars_poly`;
* :mod:`.correction`: :func:`momentum_correction`, the velocity factor that
  every momentum optimizer of both frameworks calls when the LR changes;
* :mod:`.elastic`: :class:`ElasticSchedule`, the recipe counted in examples
  seen, evaluated for the current global batch, and :class:`ElasticBatch`,
  which of the per-worker and the global batch elastic training keeps.

A :class:`Schedule` call ``schedule(step)`` is a closed-form function of the
optimizer-update count (never the recursive "multiply the current LR" form),
so the PyTorch ``LRScheduler`` and the Keras ``LearningRateSchedule`` only
evaluate it, and a resumed run gets the same LR as an uninterrupted one.
World size, rank and steps per epoch are always arguments: nothing here
imports a framework or asks Horovod for its size.

References:
    Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
    1 Hour" (linear scaling rule, gradual warmup, momentum correction).
    You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional
    Networks" (LARS, polynomial decay with power 2).

Example:
    Goyal's ImageNet recipe at a global batch of 8192 (1,281,167 images):

    >>> from hvd_largebatch import schedules
    >>> spe = schedules.steps_per_epoch(1281167, 8192)
    >>> sched = schedules.goyal(0.1, 256, 8192, steps_per_epoch=spe, epochs=90)
    >>> spe, sched.total_steps, sched.warmup_steps
    (156, 14040, 780)
    >>> [round(sched(s), 6) for s in (0, 780, 30 * 156, 60 * 156, 80 * 156)]
    [0.1, 3.2, 0.32, 0.032, 0.0032]
"""

from hvd_largebatch.schedules.batch import epochs_to_steps, global_batch_size, per_worker_batch_size, steps_per_epoch
from hvd_largebatch.schedules.builder import make_schedule
from hvd_largebatch.schedules.correction import momentum_correction
from hvd_largebatch.schedules.decay import DECAY_KINDS, MILESTONE_UNITS
from hvd_largebatch.schedules.elastic import ElasticBatch, ElasticSchedule, check_elastic_schedule
from hvd_largebatch.schedules.recipes import goyal, lars_poly
from hvd_largebatch.schedules.record import Schedule
from hvd_largebatch.schedules.scaling import SCALING_RULES, scale_lr
from hvd_largebatch.schedules.warmup import WARMUP_KINDS, WARMUP_STARTS

__all__ = [
    "SCALING_RULES",
    "WARMUP_KINDS",
    "WARMUP_STARTS",
    "DECAY_KINDS",
    "MILESTONE_UNITS",
    "Schedule",
    "ElasticSchedule",
    "ElasticBatch",
    "check_elastic_schedule",
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
