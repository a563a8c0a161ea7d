"""``create_optimizer(name, **kwargs)``: the package's Keras optimizers by name.

Variants are settings, not classes: ``"larc"`` is ``LARS(clip=True)``, as the
core registry :data:`hvd_largebatch.config.OPTIMIZERS` says; the Keras classes
are found by :func:`hvd_largebatch.config.optimizer_classes`.
"""

from __future__ import annotations

from typing import Any

from hvd_largebatch import config
from hvd_largebatch.tf.lamb import LAMB
from hvd_largebatch.tf.large_batch_optimizer import LargeBatchOptimizer
from hvd_largebatch.tf.momentum_optimizers import CLARS, LARS, SGD

__all__ = ["create_optimizer", "OPTIMIZER_CLASSES"]

#: Core record type -> the Keras class that implements it.
OPTIMIZER_CLASSES: dict[type, type[LargeBatchOptimizer]] = config.optimizer_classes(SGD, LARS, CLARS, LAMB)


def create_optimizer(name: str, **kwargs: Any) -> LargeBatchOptimizer:
    """Builds one of the package's optimizers from its name.

    Args:
        name: one of ``"sgd"``, ``"lars"``, ``"larc"``, ``"clars"``, ``"lamb"``
            (case-insensitive).
        **kwargs: constructor arguments, in Keras spelling (``learning_rate``,
            ``epsilon``, ``beta_1``, ...).

    Raises:
        ValueError: unknown ``name``, or an argument the variant fixes
            (``clip=False`` with ``"larc"``), or any invalid value.

    Example:
        >>> from hvd_largebatch.tf import create_optimizer
        >>> opt = create_optimizer("larc", learning_rate=0.2, weight_decay=5e-4)
        >>> type(opt).__name__, opt.clip
        ('LARS', True)
    """
    key, spec, kwargs = config.resolve_optimizer(name, kwargs)
    kwargs.setdefault("name", key)
    return OPTIMIZER_CLASSES[spec.record_type](**kwargs)
