"""``create_optimizer(name, **kwargs)``: the package's Keras optimizers by name, also for ``model.compile``.

Variants are settings, not classes: ``"larc"`` is ``LARS(clip=True)``, as the
core registry :data:`hvd_largebatch.config.OPTIMIZERS` says; the Keras classes
are found by :func:`hvd_largebatch.config.optimizer_classes`.

Importing :mod:`hvd_largebatch.tf` also registers the names with Keras
(:func:`register_optimizer_names`), so ``model.compile(optimizer="lars")``
and ``keras.optimizers.get("larc")`` build the package's optimizers with
their defaults, and ``keras.optimizers.get({"class_name": "lamb", "config":
{"learning_rate": 0.01}})`` with arguments. ``"sgd"`` stays Keras's own SGD
(:data:`KERAS_OWN_NAMES`); the package's is ``create_optimizer("sgd")`` or
``hvd_largebatch.tf.SGD``.
"""

from __future__ import annotations

from typing import Any

import keras

from hvd_largebatch import config
from hvd_largebatch.tf.lamb import LAMB
from hvd_largebatch.tf.large_batch_optimizer import LargeBatchOptimizer
from hvd_largebatch.tf.momentum_optimizers import CLARS, LARS, SGD

__all__ = ["create_optimizer", "OPTIMIZER_CLASSES", "KERAS_OWN_NAMES", "KERAS_NAMES", "register_optimizer_names"]

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


#: Names of the core registry that Keras already gives to its own optimizers: left to Keras.
KERAS_OWN_NAMES = ("sgd",)
#: The names that ``model.compile(optimizer=...)`` and ``keras.optimizers.get`` resolve to the package's optimizers.
KERAS_NAMES = tuple(name for name in config.OPTIMIZER_NAMES if name not in KERAS_OWN_NAMES)


class _OptimizerByName:
    """What Keras's name lookup finds under one of :data:`KERAS_NAMES`.

    ``keras.optimizers.get(name)`` deserialises ``{"class_name": name,
    "config": {...}}``: it finds this object among the custom objects and
    calls its ``from_config`` with the config, here :func:`create_optimizer`.
    """

    def __init__(self, name: str):
        self.name = name

    def from_config(self, config_: dict[str, Any]) -> LargeBatchOptimizer:
        return create_optimizer(self.name, **config_)

    def __repr__(self) -> str:
        return f"hvd_largebatch.tf optimizer {self.name!r}"


def register_optimizer_names() -> None:
    """Makes :data:`KERAS_NAMES` known to ``keras.optimizers.get`` (and so to ``model.compile``).

    Idempotent; a name the user registered first for something else is left alone.

    Example:
        >>> import keras
        >>> import hvd_largebatch.tf  # registers the names
        >>> opt = keras.optimizers.get("larc")
        >>> type(opt).__name__, opt.clip, opt.name
        ('LARS', True, 'larc')
    """
    custom_objects = keras.saving.get_custom_objects()
    for name in KERAS_NAMES:
        if not isinstance(custom_objects.get(name, _OptimizerByName(name)), _OptimizerByName):
            continue
        custom_objects[name] = _OptimizerByName(name)


register_optimizer_names()
