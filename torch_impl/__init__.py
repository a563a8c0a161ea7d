"""hvd_largebatch.torch_impl: large-batch training for PyTorch on Horovod.

Optimizers (LR inside the velocity, momentum correction, per-tensor weight
decay and trust-ratio switches, a non-finite-gradient policy; math in
ALGORITHMS.md): :class:`SGD`, :class:`LARS` (``clip=True`` is LARC),
:class:`CLARS`, :class:`LAMB` and :func:`create_optimizer`. Goyal's
per-iteration warmup: :class:`GradualWarmupScheduler` over a core
``hvd_largebatch.schedules.Schedule``. Horovod glue:
:func:`DistributedOptimizer`, :func:`broadcast_state`,
:func:`average_batchnorm_statistics` (BatchNorm running statistics averaged
over ranks before evaluation or a checkpoint), the gradient noise
scale (critical batch) :class:`NoiseScaleMonitor`, rank-0
:func:`save_checkpoint` / :func:`load_checkpoint`; CLARS's per-example
norms: :func:`per_example_grad_norms`. ConAdv (Liu, You et al. 2022):
:class:`ConAdv`, :func:`lookahead`, and :func:`convert_to_dual_bn` for the
auxiliary BatchNorm of adversarial examples. Horovod elastic training:
:mod:`hvd_largebatch.torch_impl.elastic` (``ElasticState``,
``ElasticLRScheduler``; imported on request, it needs ``horovod.torch``).

Example (launched with ``horovodrun -np 2 -H localhost:2 python train.py``)::

    import horovod.torch as hvd
    from hvd_largebatch import schedules
    from hvd_largebatch.torch_impl import LARS, GradualWarmupScheduler, DistributedOptimizer, broadcast_state
    hvd.init()
    epochs = 10
    opt = LARS(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = DistributedOptimizer(opt, named_parameters=model.named_parameters())
    sched = GradualWarmupScheduler(opt, schedules.goyal(0.1, 256, batch * hvd.size(), steps_per_epoch, epochs=epochs))
    broadcast_state(model, opt, root_rank=0)
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sched.step()
"""

from hvd_largebatch.torch_impl.batchnorm_statistics import average_batchnorm_statistics
from hvd_largebatch.torch_impl.checkpoint import load_checkpoint, save_checkpoint
from hvd_largebatch.torch_impl.clars import CLARS
from hvd_largebatch.torch_impl.conadv import ConAdv, lookahead, make_adversarial_examples
from hvd_largebatch.torch_impl.distributed import DistributedOptimizer, broadcast_state
from hvd_largebatch.torch_impl.dual_bn import (
    DualBatchNorm1d,
    DualBatchNorm2d,
    DualBatchNorm3d,
    auxiliary_bn,
    convert_from_dual_bn,
    convert_to_dual_bn,
)
from hvd_largebatch.torch_impl.lamb import LAMB
from hvd_largebatch.torch_impl.lamb_functional import lamb_update
from hvd_largebatch.torch_impl.lars import LARS
from hvd_largebatch.torch_impl.momentum_functional import momentum_update
from hvd_largebatch.torch_impl.noise_scale import NoiseScaleMonitor
from hvd_largebatch.torch_impl.optimizer_base import LargeBatchOptimizer
from hvd_largebatch.torch_impl.optimizer_factory import create_optimizer
from hvd_largebatch.torch_impl.per_example_norms import (
    loss_and_grad_norm_sums,
    per_example_grad_norm_sums,
    per_example_grad_norms,
)
from hvd_largebatch.torch_impl.sgd import SGD
from hvd_largebatch.torch_impl.warmup_scheduler import GradualWarmupScheduler

__all__ = [
    "SGD", "LARS", "CLARS", "LAMB",
    "LargeBatchOptimizer",
    "create_optimizer",
    "momentum_update",
    "lamb_update",
    "GradualWarmupScheduler",
    "DistributedOptimizer",
    "broadcast_state",
    "average_batchnorm_statistics",
    "NoiseScaleMonitor",
    "save_checkpoint",
    "load_checkpoint",
    "per_example_grad_norms",
    "loss_and_grad_norm_sums",
    "per_example_grad_norm_sums",
    "ConAdv",
    "lookahead",
    "make_adversarial_examples",
    "convert_to_dual_bn",
    "convert_from_dual_bn",
    "auxiliary_bn",
    "DualBatchNorm1d",
    "DualBatchNorm2d",
    "DualBatchNorm3d",
]
