"""``create_optimizer(name, **kwargs)``: the package's Keras optimizers by name.

Variants are settings, not classes: ``"larc"`` is ``LARS(clip=True)``.
"""

from __future__ import annotations

from typing import Any

from hvd_largebatch import config
from hvd_largebatch.tf.lamb import LAMB
from hvd_largebatch.tf.large_batch_optimizer import LargeBatchOptimizer
from hvd_largebatch.tf.momentum_optimizers import CLARS, LARS, SGD

__all__ = ["create_optimizer"]

_CLASSES: dict[str, tuple[type[LargeBatchOptimizer], dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "lars": (LARS, {}),
    "larc": (LARS, {"clip": True}),
    "clars": (CLARS, {}),
    "lamb": (LAMB, {}),
}
assert set(_CLASSES) == set(config.OPTIMIZER_NAMES), "keep in step with hvd_largebatch.config"


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
    key = name.lower() if isinstance(name, str) else name
    if key not in _CLASSES:
        raise ValueError(f"name must be one of {', '.join(map(repr, config.OPTIMIZER_NAMES))}; got {name!r}")
    cls, fixed = _CLASSES[key]
    for field, value in fixed.items():
        if field in kwargs and kwargs[field] != value:
            raise ValueError(f"{field}={kwargs[field]!r} contradicts optimizer {key!r}, which sets {field}={value!r}")
    kwargs = {**kwargs, **fixed}
    kwargs.setdefault("name", key)
    return cls(**kwargs)
