"""``create_optimizer(name, params, **kwargs)``: every optimizer of the package by name (LARC is a setting of LARS).

What each name means is the core registry's (:data:`hvd_largebatch.config.OPTIMIZERS`);
:func:`hvd_largebatch.config.optimizer_classes` finds the torch class of each record.
"""

from __future__ import annotations

import inspect
from typing import Any

from hvd_largebatch import config
from hvd_largebatch.torch_impl.clars import CLARS
from hvd_largebatch.torch_impl.lamb import LAMB
from hvd_largebatch.torch_impl.lars import LARS
from hvd_largebatch.torch_impl.optimizer_base import LargeBatchOptimizer
from hvd_largebatch.torch_impl.sgd import SGD

__all__ = ["create_optimizer", "OPTIMIZER_CLASSES"]

#: Core record type -> the torch class that implements it.
OPTIMIZER_CLASSES: dict[type, type[LargeBatchOptimizer]] = config.optimizer_classes(SGD, LARS, CLARS, LAMB)


def create_optimizer(name: str, params: Any, **kwargs: Any) -> LargeBatchOptimizer:
    """Builds optimizer ``name`` over ``params``.

    Args:
        name: ``"sgd"``, ``"lars"``, ``"larc"`` (LARS with ``clip=True``),
            ``"clars"`` or ``"lamb"`` (case-insensitive).
        params: tensors, ``(name, tensor)`` pairs or param-group dicts.
        **kwargs: the class's arguments (torch spelling, e.g. ``betas`` for LAMB).

    Raises:
        ValueError: unknown ``name``, an argument the optimizer does not take,
            one that contradicts the name (``clip=False`` for ``"larc"``), or
            a value out of range.

    Example:
        >>> import torch
        >>> from hvd_largebatch.torch_impl import create_optimizer
        >>> opt = create_optimizer("larc", torch.nn.Linear(2, 2).named_parameters(), lr=0.5)
        >>> type(opt).__name__, opt.param_groups[0]["clip"]
        ('LARS', True)
    """
    key, spec, _ = config.resolve_optimizer(name, {})
    cls = OPTIMIZER_CLASSES[spec.record_type]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} for optimizer {key!r}; allowed: {', '.join(accepted)}"
        )
    _, _, kwargs = config.resolve_optimizer(key, kwargs)
    return cls(params, **kwargs)
