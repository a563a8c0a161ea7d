"""The one map between Keras argument names and the core's field names (``learning_rate`` <-> ``lr``).

The core records of :mod:`hvd_largebatch.config` use the core spelling
(``lr``, ``eps``, ``beta1``, ``beta2``); Keras optimizers take
``learning_rate``, ``epsilon``, ``beta_1``, ``beta_2``. The optimizers, the
bench runner and the tests translate with these functions only.
PyTorch's counterpart is :mod:`hvd_largebatch.torch_impl.core_spelling`
(torch differs only in LAMB's ``betas`` pair).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "KERAS_TO_CORE_NAMES",
    "CORE_TO_KERAS_NAMES",
    "to_core",
    "to_keras",
    "error_in_keras_spelling",
    "refuse_other_spellings",
]

#: Keras argument names and the names of the same fields in hvd_largebatch.config.
KERAS_TO_CORE_NAMES = {"learning_rate": "lr", "epsilon": "eps", "beta_1": "beta1", "beta_2": "beta2"}
#: The inverse of :data:`KERAS_TO_CORE_NAMES`.
CORE_TO_KERAS_NAMES = {core: keras_name for keras_name, core in KERAS_TO_CORE_NAMES.items()}


def to_core(keras_args: Mapping[str, Any]) -> dict[str, Any]:
    """Keras-spelled arguments in core spelling; other names pass unchanged.

    Example:
        >>> to_core({"learning_rate": 0.1, "beta_1": 0.9, "weight_decay": 0.0})
        {'lr': 0.1, 'beta1': 0.9, 'weight_decay': 0.0}
    """
    return {KERAS_TO_CORE_NAMES.get(name, name): value for name, value in keras_args.items()}


def to_keras(core_args: Mapping[str, Any]) -> dict[str, Any]:
    """Core-spelled fields (a record's ``to_dict()``) in Keras spelling; other names pass unchanged.

    Example:
        >>> to_keras({"lr": 0.1, "eps": 1e-6, "weight_decay": 0.01})
        {'learning_rate': 0.1, 'epsilon': 1e-06, 'weight_decay': 0.01}
    """
    return {CORE_TO_KERAS_NAMES.get(name, name): value for name, value in core_args.items()}


def error_in_keras_spelling(error: ValueError) -> ValueError:
    """A core validation error that names a core field (``lr ...``) rewritten with the Keras name (``learning_rate ...``)."""
    message = str(error)
    for core, keras_name in CORE_TO_KERAS_NAMES.items():
        if message.startswith(core + " "):
            return ValueError(keras_name + message[len(core):])
    return ValueError(message)


def refuse_other_spellings(owner: str, kwargs: Mapping[str, Any]) -> None:
    """Refuses core or PyTorch spellings given to a Keras optimizer, naming the Keras argument to use.

    Keras's own message for ``LARS(lr=0.1)`` is "Argument(s) not recognized",
    which does not say that ``learning_rate`` is meant. This names every such
    argument with its value and the Keras spelling, including torch's pair
    ``betas=(b1, b2)`` (``beta_1``, ``beta_2``).

    Args:
        owner: the optimizer class name, for the message.
        kwargs: the keyword arguments the optimizer did not take itself.

    Raises:
        ValueError: when ``kwargs`` holds ``lr``, ``eps``, ``beta1``, ``beta2`` or ``betas``.

    Example:
        >>> refuse_other_spellings("LARS", {"lr": 0.1})
        Traceback (most recent call last):
        ...
        ValueError: LARS got lr=0.1: Keras optimizers take learning_rate=0.1 instead
    """
    given, wanted = [], []
    for name, value in kwargs.items():
        if name in CORE_TO_KERAS_NAMES:
            given.append(f"{name}={value!r}")
            wanted.append(f"{CORE_TO_KERAS_NAMES[name]}={value!r}")
        elif name == "betas":
            given.append(f"betas={value!r}")
            pair = isinstance(value, (tuple, list)) and len(value) == 2
            wanted.append(f"beta_1={value[0]!r}, beta_2={value[1]!r}" if pair else "beta_1=..., beta_2=...")
    if given:
        raise ValueError(f"{owner} got {', '.join(given)}: Keras optimizers take {', '.join(wanted)} instead")
