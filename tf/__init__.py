"""hvd_largebatch.tf: the Keras 3 (TensorFlow backend) side of hvd_largebatch.

Optimizers (``keras.optimizers.Optimizer`` subclasses, serialisable):
:class:`SGD` (LR inside the velocity, momentum correction), :class:`LARS`
(``clip=True`` is LARC), :class:`CLARS`, :class:`LAMB` and
:func:`create_optimizer`.

Horovod glue (uses only ``horovod.tensorflow`` ops, imported when first
needed): :class:`DistributedOptimizer`, the :mod:`callbacks` module
(broadcast, metric averaging, per-batch LR from a core schedule) and
:class:`CLARSModel` (per-example gradient norms for CLARS under ``model.fit``).
:class:`ScheduleAdapter` turns a core :class:`hvd_largebatch.schedules.Schedule`
into a Keras ``LearningRateSchedule``.
"""

from hvd_largebatch.tf.lamb import LAMB
from hvd_largebatch.tf.large_batch_optimizer import LargeBatchOptimizer
from hvd_largebatch.tf.momentum_optimizers import CLARS, LARS, SGD
from hvd_largebatch.tf.optimizer_factory import create_optimizer

__all__ = ["SGD", "LARS", "CLARS", "LAMB", "LargeBatchOptimizer", "create_optimizer"]
