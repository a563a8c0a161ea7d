"""Horovod glue for PyTorch: the distributed optimizer, exact state broadcast, and the small CLARS allreduce.

``horovod.torch`` is imported only inside these functions, so the optimizers
work without Horovod. The semantics tests pin down (DESIGN.md): gradients
are *averaged* over the global batch before ``step()``; after any number of
steps every rank holds bit-identical weights and optimizer state; rank 0's
weights and state are broadcast at start and on resume.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from hvd_largebatch import config, errors
from hvd_largebatch.errors import HorovodNotInitialisedError

__all__ = ["DistributedOptimizer", "broadcast_state", "allreduce_sum_across_workers", "horovod_rank"]


def _active_horovod() -> Any | None:
    """``horovod.torch`` when it has been imported and initialised, else None (no import side effect)."""
    hvd = sys.modules.get("horovod.torch")
    if hvd is None or not hvd.is_initialized():
        return None
    return hvd


def horovod_rank() -> int:
    """This process's Horovod rank, 0 when Horovod is not running."""
    hvd = _active_horovod()
    return 0 if hvd is None else hvd.rank()


def allreduce_sum_across_workers(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Sums ``tensor`` over all Horovod processes (one allreduce); returns it unchanged without Horovod or with one process."""
    hvd = _active_horovod()
    if hvd is None or hvd.size() == 1:
        return tensor
    return hvd.allreduce(tensor, op=hvd.Sum, name=name)


def _horovod() -> Any:
    try:
        import horovod.torch as hvd
    except ImportError as error:  # pragma: no cover - the project always builds Horovod
        raise RuntimeError("horovod.torch is not installed: run `make setup`") from error
    if not hvd.is_initialized():
        raise HorovodNotInitialisedError("horovod.torch")
    return hvd


def DistributedOptimizer(  # noqa: N802 - Horovod's spelling, so user code reads the same
    optimizer: torch.optim.Optimizer,
    named_parameters: Any = None,
    compression: Any = None,
    backward_passes_per_step: int = 1,
    op: Any = None,
    gradient_predivide_factor: float = 1.0,
    groups: Any = None,
    sparse_as_dense: bool = False,
    process_set: Any = None,
) -> torch.optim.Optimizer:
    """Wraps an optimizer with ``horovod.torch.DistributedOptimizer`` (gradient averaging by allreduce).

    A pass-through of Horovod's options with three additions:

    * ``named_parameters`` defaults to the names the optimizer was built with
      (``model.named_parameters()``), so allreduce names are stable;
    * Horovod rebuilds the optimizer class from ``param_groups`` alone; our
      optimizers keep every hyperparameter and per-tensor switch there, and
      this function also carries over existing optimizer state, the skip
      count and trust-ratio recording, which Horovod would drop;
    * the input is validated before Horovod sees it: ``optimizer`` must be a
      ``torch.optim.Optimizer`` not already wrapped, ``named_parameters``
      must not be an exhausted generator, ``backward_passes_per_step`` an
      integer >= 1.

    Args:
        optimizer: an optimizer of this package (or any torch optimizer).
        named_parameters: ``(name, tensor)`` pairs; default from the optimizer's names.
        compression: ``hvd.Compression.none`` (default) or ``.fp16``.
        backward_passes_per_step: local gradient accumulation before the allreduce.
        op: ``hvd.Average`` (default), ``hvd.Sum`` or ``hvd.Adasum``.
        gradient_predivide_factor, groups, sparse_as_dense, process_set: as Horovod.

    Returns:
        The Horovod-wrapped optimizer (an instance of a subclass of ``type(optimizer)``).

    Raises:
        TypeError: naming ``optimizer`` when it is not a ``torch.optim.Optimizer``
            (e.g. a Keras optimizer).
        ValueError: "wrap it only once" when ``optimizer`` is already
            Horovod-wrapped; naming ``named_parameters`` when it is empty
            (a ``model.named_parameters()`` generator that something already
            read); naming ``backward_passes_per_step`` when it is not an integer >= 1.
        HorovodNotInitialisedError: when ``hvd.init()`` was not called.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise errors.not_an_optimizer("torch.optim.Optimizer", optimizer)
    if _is_horovod_wrapped(optimizer):
        raise errors.wrapped_twice()
    if named_parameters is not None:
        named_parameters = list(named_parameters)
        if not named_parameters and any(g["params"] for g in optimizer.param_groups):
            raise ValueError(
                "named_parameters is empty, but the optimizer has parameters: a generator such as "
                "model.named_parameters() can be read only once, and this one was already consumed (e.g. by the "
                "optimizer's constructor); pass list(model.named_parameters()), or leave named_parameters out to "
                "use the names the optimizer was built with"
            )
    backward_passes_per_step = config.check_positive_int("backward_passes_per_step", backward_passes_per_step)
    hvd = _horovod()
    if named_parameters is None and all("param_names" in g for g in optimizer.param_groups):
        named_parameters = [
            (name, p) for g in optimizer.param_groups for name, p in zip(g["param_names"], g["params"])
        ]
    kwargs: dict[str, Any] = dict(
        named_parameters=named_parameters,
        compression=hvd.Compression.none if compression is None else compression,
        backward_passes_per_step=backward_passes_per_step,
        op=hvd.Average if op is None else op,
        gradient_predivide_factor=gradient_predivide_factor,
        groups=groups,
        sparse_as_dense=sparse_as_dense,
    )
    if process_set is not None:
        kwargs["process_set"] = process_set
    had_state = bool(optimizer.state)
    saved = optimizer.state_dict() if had_state else None
    wrapped = hvd.DistributedOptimizer(optimizer, **kwargs)
    if saved is not None:
        wrapped.load_state_dict(saved)
    for attribute in ("skipped_steps", "_recording_trust_ratios"):
        if hasattr(optimizer, attribute):
            setattr(wrapped, attribute, getattr(optimizer, attribute))
    return wrapped


def _is_horovod_wrapped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s class is (or derives from) one that ``horovod.torch.DistributedOptimizer`` built.

    Horovod builds the wrapper class by copying the methods of its private
    ``_DistributedOptimizer`` (or ``_DistributedAdasumOptimizer``) into a
    subclass of the user's class: the copied ``synchronize`` and
    ``_allreduce_grad_async`` identify it.
    """
    return any("synchronize" in vars(cls) and "_allreduce_grad_async" in vars(cls) for cls in type(optimizer).__mro__)


class _TensorSlot:
    """Stands for a tensor in the broadcast structure: its shape, dtype and device type."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.device_type = tensor.device.type


def _map_leaves(value: Any, leaf_type: type, fn: Callable[[Any], Any]) -> Any:
    """``value`` with each ``leaf_type`` inside dicts, lists and tuples replaced by ``fn(leaf)``, in order."""
    if isinstance(value, leaf_type):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf_type, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_leaves(v, leaf_type, fn) for v in value)
    return value


def _strip_tensors(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by a :class:`_TensorSlot` (tensors appended in traversal order)."""

    def strip(tensor: torch.Tensor) -> _TensorSlot:
        tensors.append(tensor)
        return _TensorSlot(tensor)

    return _map_leaves(value, torch.Tensor, strip)


def _fill_tensors(value: Any, make: Any) -> Any:
    """Inverse of :func:`_strip_tensors`: each slot becomes ``make(slot)``, in the same order."""
    return _map_leaves(value, _TensorSlot, make)


def broadcast_state(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None, root_rank: int = 0) -> None:
    """Makes every rank's weights, buffers and optimizer state exactly rank ``root_rank``'s.

    Unlike ``horovod.torch.broadcast_optimizer_state``, which fills an empty
    state by running a ``step()`` with zero gradients (with coupled weight
    decay that step moves the weights and seeds the momentum), nothing is
    stepped: the model's parameters and buffers are broadcast in place, then
    the optimizer's ``state_dict()`` is sent as a structure (one
    ``broadcast_object``, tensors replaced by shape/dtype slots) followed by
    one broadcast per state tensor, and the other ranks load it. Param
    groups (LR, hyperparameters, per-tensor switches), per-parameter state
    (velocities, ``prev_lr``, moments, step counts) and the skip count all
    end up identical. With one process it does nothing.

    Args:
        model: the module (parameters and buffers), or None.
        optimizer: the optimizer (Horovod-wrapped or not), or None.
        root_rank: the rank whose state wins.

    Raises:
        HorovodNotInitialisedError: when ``hvd.init()`` was not called (the
            ranks would silently keep their own weights).
    """
    hvd = _horovod()
    if hvd.size() == 1:
        return
    root_rank = config.check_int_in_range("root_rank", root_rank, 0, hvd.size())
    if model is not None:
        hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)
    if optimizer is None:
        return
    is_root = hvd.rank() == root_rank
    tensors: list[torch.Tensor] = []
    structure = _strip_tensors(optimizer.state_dict(), tensors) if is_root else None
    structure = hvd.broadcast_object(structure, root_rank=root_rank, name="hvd_largebatch.optimizer_state")

    received: list[torch.Tensor] = []

    def receive(slot: _TensorSlot) -> torch.Tensor:
        index = len(received)
        if is_root:
            tensor = tensors[index]
        else:
            device = "cpu" if slot.device_type == "cpu" else torch.device(slot.device_type, torch.cuda.current_device())
            tensor = torch.empty(slot.shape, dtype=slot.dtype, device=device)
        received.append(tensor)
        return tensor

    filled = _fill_tensors(structure, receive)
    handles = [
        hvd.broadcast_async_(tensor, root_rank=root_rank, name=f"hvd_largebatch.optimizer_state.{i}")
        for i, tensor in enumerate(received)
    ]
    for handle in handles:
        hvd.synchronize(handle)
    if not is_root:
        optimizer.load_state_dict(filled)
