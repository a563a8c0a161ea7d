"""Checkpoints written and read by rank 0 only, whose resume continues exactly.

A checkpoint holds the model's ``state_dict()``, the optimizer's (velocities,
``prev_lr``, moments, step counts, skip count, param groups with their LRs),
the scheduler's (its step and schedule config), the training step and any
JSON-like ``extra``. Only rank 0 writes (to a temporary file renamed into
place, so a crash never leaves half a checkpoint); on load rank 0 reads the
file and :func:`~hvd_largebatch.torch_impl.distributed.broadcast_state`
hands the exact weights and state to the other ranks, with the scheduler
state, step and extra sent by one ``broadcast_object``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from hvd_largebatch import config
from hvd_largebatch.torch_impl.distributed import _active_horovod, broadcast_state, horovod_rank

__all__ = ["save_checkpoint", "load_checkpoint"]

_FORMAT = "hvd_largebatch.torch_impl.checkpoint/1"


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    root_rank: int = 0,
) -> bool:
    """Writes a checkpoint from rank ``root_rank`` (every rank may call it; the others do nothing).

    Args:
        path: the file to write (its directory is created).
        model, optimizer, scheduler: what to save (scheduler optional).
        step: the number of optimizer updates done so far.
        extra: anything else to restore (epoch, RNG seeds, metrics), made of
            tensors, numbers, strings, lists and dicts.
        root_rank: the writing rank.

    Returns:
        True on the rank that wrote the file.
    """
    step = config.check_non_negative_int("step", step)
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be None or a dict, got {type(extra).__name__}")
    if horovod_rank() != root_rank:
        return False
    payload = {
        "format": _FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "step": step,
        "extra": extra or {},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return True


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    root_rank: int = 0,
) -> dict[str, Any]:
    """Restores a checkpoint on every rank: rank ``root_rank`` reads it, the others receive it.

    Call it on every rank after building the model, the (wrapped) optimizer
    and the scheduler. Weights, buffers and optimizer state end up exactly
    as saved on every rank.

    Returns:
        ``{"step": int, "extra": dict}`` as saved.

    Raises:
        ValueError: naming ``path`` when the file is missing (on the reading
            rank) or is not a checkpoint of this module.
    """
    hvd = _active_horovod()
    distributed = hvd is not None and hvd.size() > 1
    reading = horovod_rank() == root_rank
    payload, problem = None, None
    if reading:
        payload, problem = _read(path)
    if distributed:  # every rank learns whether the read worked, so none waits forever
        problem = hvd.broadcast_object(problem, root_rank=root_rank, name="hvd_largebatch.checkpoint.status")
    if problem is not None:
        raise ValueError(problem)
    rest = None
    if reading:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload["scheduler"] is not None:
            scheduler.load_state_dict(payload["scheduler"])
        rest = {"scheduler": payload["scheduler"], "step": payload["step"], "extra": payload["extra"]}
    if distributed:
        broadcast_state(model, optimizer, root_rank=root_rank)
        rest = hvd.broadcast_object(rest, root_rank=root_rank, name="hvd_largebatch.checkpoint")
        if not reading and scheduler is not None and rest["scheduler"] is not None:
            scheduler.load_state_dict(rest["scheduler"])
    return {"step": rest["step"], "extra": rest["extra"]}


def _read(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """``(payload, None)`` or ``(None, error message naming path)``."""
    if not Path(path).is_file():
        return None, f"path {str(path)!r} is not a checkpoint file"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        return None, f"path {str(path)!r} could not be read as a checkpoint: {error}"
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        return None, f"path {str(path)!r} is not a checkpoint written by save_checkpoint"
    return payload, None
