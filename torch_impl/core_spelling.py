"""The one map between torch argument names and the core's field names (LAMB's ``betas`` <-> ``beta1, beta2``).

torch optimizers take LAMB's moment decay rates as one pair ``betas``, as
``torch.optim.Adam`` does; the core records of :mod:`hvd_largebatch.config`
have two fields ``beta1`` and ``beta2``. Every other name is spelled alike.
The optimizers and the bench runner translate with these functions only.
Keras's counterpart is :mod:`hvd_largebatch.tf.core_spelling`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["to_core", "to_torch", "error_in_torch_spelling"]


def _split_betas(betas: Any) -> tuple[Any, Any]:
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    return betas[0], betas[1]


def to_core(torch_args: Mapping[str, Any]) -> dict[str, Any]:
    """torch-spelled arguments in core spelling (``betas`` becomes ``beta1``, ``beta2``).

    Raises:
        ValueError: naming ``betas`` when it is not a pair.

    Example:
        >>> to_core({"lr": 0.01, "betas": (0.9, 0.99)})
        {'lr': 0.01, 'beta1': 0.9, 'beta2': 0.99}
    """
    args = dict(torch_args)
    if "betas" in args:
        args["beta1"], args["beta2"] = _split_betas(args.pop("betas"))
    return args


def to_torch(core_args: Mapping[str, Any]) -> dict[str, Any]:
    """Core-spelled fields (a record's ``to_dict()``) in torch spelling (``beta1``, ``beta2`` become ``betas``).

    Example:
        >>> to_torch({"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "eps": 1e-6})
        {'lr': 0.01, 'eps': 1e-06, 'betas': (0.9, 0.99)}
    """
    args = dict(core_args)
    if "beta1" in args or "beta2" in args:
        args["betas"] = (args.pop("beta1"), args.pop("beta2"))
    return args


def error_in_torch_spelling(error: ValueError) -> ValueError:
    """A core validation error that names ``beta1``/``beta2`` rewritten to name ``betas[0]``/``betas[1]``."""
    message = str(error)
    for index, core in enumerate(("beta1", "beta2")):
        if message.startswith(core):
            return ValueError(f"betas[{index}] ({message})")
    return ValueError(message)
