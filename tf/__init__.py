"""hvd_largebatch.tf: the Keras 3 (TensorFlow backend) side of hvd_largebatch.

Optimizers (``keras.optimizers.Optimizer`` subclasses, serialisable):
:class:`SGD` (LR inside the velocity, momentum correction), :class:`LARS`
(``clip=True`` is LARC), :class:`CLARS`, :class:`LAMB` and
:func:`create_optimizer`.

Horovod glue (uses only ``horovod.tensorflow`` ops, imported when first
needed): :class:`DistributedOptimizer` (and, for the ``mixed_float16``
policy, :class:`DistributedLossScaleOptimizer` around it), the :mod:`~hvd_largebatch.tf.callbacks`
module (broadcast, metric averaging, per-batch LR from a core schedule with
momentum correction) and :class:`CLARSModel` (per-example gradient norms for
CLARS under ``model.fit``). :class:`NoiseScaleMonitor` reports the gradient
noise scale (critical batch) in the logs. :class:`ScheduleAdapter` turns a core
:class:`hvd_largebatch.schedules.Schedule` into a Keras ``LearningRateSchedule``.
ConAdv (Liu, You et al. 2022): :class:`ConAdv`, a model wrapper whose
``train_step`` trains on clean plus adversarial examples from stale weights,
and :func:`convert_to_dual_bn` for the auxiliary BatchNorm. Horovod elastic
training under ``model.fit``: :mod:`hvd_largebatch.tf.elastic` (imported on
request, it needs ``horovod.tensorflow``). BatchNorm moving statistics
averaged over the ranks: :func:`average_batchnorm_statistics` and the
callback :class:`AverageBatchNormStatistics`. Importing this package also
registers the optimizer names with Keras (``model.compile(optimizer="lars")``).

Example (run with ``horovodrun -np 2 -H localhost:2 python train.py``)::

    import keras, horovod.tensorflow as hvd
    from hvd_largebatch import schedules
    from hvd_largebatch.tf import LARS, DistributedOptimizer, callbacks
    hvd.init()
    opt = DistributedOptimizer(LARS(learning_rate=0.1, momentum=0.9, weight_decay=5e-4))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    epochs = 10
    sched = schedules.goyal(0.1, 256, per_worker_batch * hvd.size(), steps_per_epoch, epochs=epochs)
    model.fit(x_shard, y_shard, batch_size=per_worker_batch, epochs=epochs,
              callbacks=[callbacks.BroadcastGlobalVariablesCallback(0),
                         callbacks.MetricAverageCallback(),
                         callbacks.GradualWarmupCallback(sched)],
              verbose=1 if hvd.rank() == 0 else 0)
"""

from hvd_largebatch.tf import callbacks
from hvd_largebatch.tf.batchnorm_statistics import (
    AverageBatchNormStatistics,
    average_batchnorm_statistics,
    batchnorm_moving_statistics,
)
from hvd_largebatch.tf.clars_model import CLARSModel
from hvd_largebatch.tf.conadv import ConAdv
from hvd_largebatch.tf.distributed import DistributedOptimizer
from hvd_largebatch.tf.dual_bn import DualBatchNormalization, auxiliary_bn, convert_from_dual_bn, convert_to_dual_bn
from hvd_largebatch.tf.lamb import LAMB
from hvd_largebatch.tf.mixed_precision import DistributedLossScaleOptimizer
from hvd_largebatch.tf.large_batch_optimizer import LargeBatchOptimizer
from hvd_largebatch.tf.momentum_optimizers import CLARS, LARS, SGD
from hvd_largebatch.tf.noise_scale import NoiseScaleMonitor
from hvd_largebatch.tf.optimizer_factory import create_optimizer
from hvd_largebatch.tf.per_example_norms import per_example_grad_norm_sums
from hvd_largebatch.tf.schedule_adapter import ScheduleAdapter

__all__ = [
    "SGD", "LARS", "CLARS", "LAMB",
    "LargeBatchOptimizer",
    "create_optimizer",
    "DistributedOptimizer",
    "DistributedLossScaleOptimizer",
    "NoiseScaleMonitor",
    "callbacks",
    "CLARSModel",
    "per_example_grad_norm_sums",
    "ScheduleAdapter",
    "ConAdv",
    "DualBatchNormalization",
    "convert_to_dual_bn",
    "convert_from_dual_bn",
    "auxiliary_bn",
    "batchnorm_moving_statistics",
    "average_batchnorm_statistics",
    "AverageBatchNormStatistics",
]
