"""``create_optimizer(name, params, **kwargs)``: every optimizer of the package by name (LARC is a setting of LARS)."""

from __future__ import annotations

import inspect
from typing import Any

from hvd_largebatch import config
from hvd_largebatch.torch_impl.clars import CLARS
from hvd_largebatch.torch_impl.lamb import LAMB
from hvd_largebatch.torch_impl.lars import LARS
from hvd_largebatch.torch_impl.optimizer_base import LargeBatchOptimizer
from hvd_largebatch.torch_impl.sgd import SGD

__all__ = ["create_optimizer", "OPTIMIZERS"]

#: name -> (class, arguments the name fixes). The names are the core's ``OPTIMIZER_NAMES``.
OPTIMIZERS: dict[str, tuple[type[LargeBatchOptimizer], dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "lars": (LARS, {}),
    "larc": (LARS, {"clip": True}),
    "clars": (CLARS, {}),
    "lamb": (LAMB, {}),
}
assert tuple(OPTIMIZERS) == config.OPTIMIZER_NAMES


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
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"name must be one of {', '.join(map(repr, OPTIMIZERS))}; got {name!r}")
    cls, fixed = OPTIMIZERS[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} for optimizer {key!r}; allowed: {', '.join(accepted)}"
        )
    for field, value in fixed.items():
        if field in kwargs and kwargs[field] != value:
            raise ValueError(f"{field}={kwargs[field]!r} contradicts optimizer {key!r}, which sets {field}={value!r}")
    return cls(params, **{**kwargs, **fixed})
