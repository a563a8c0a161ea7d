"""Dual BatchNorm's routing switch, written once for both frameworks.

A dual BatchNorm layer (``torch_impl/dual_bn.py``, ``tf/dual_bn.py``) holds a
main and an auxiliary BatchNorm and calls the auxiliary one while its boolean
attribute ``use_auxiliary`` is True. Switching is plain attribute setting, so
the framework libraries share this context manager and only find their own
dual layers.

Example:
    >>> from types import SimpleNamespace
    >>> layers = [SimpleNamespace(use_auxiliary=False), SimpleNamespace(use_auxiliary=True)]
    >>> with routed_to_auxiliary(layers):
    ...     [layer.use_auxiliary for layer in layers]
    [True, True]
    >>> [layer.use_auxiliary for layer in layers]
    [False, True]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["routed_to_auxiliary"]


@contextlib.contextmanager
def routed_to_auxiliary(layers: Sequence[Any]) -> Iterator[None]:
    """Sets ``use_auxiliary = True`` on every layer inside the block; restores each previous value on exit.

    The values are restored also on error. Not thread-safe for layers shared
    between threads (ConAdv's background attack in PyTorch uses its own snapshot copy).

    Args:
        layers: the dual layers to switch (an empty sequence makes the block a no-op).
    """
    previous = [layer.use_auxiliary for layer in layers]
    for layer in layers:
        layer.use_auxiliary = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.use_auxiliary = value
