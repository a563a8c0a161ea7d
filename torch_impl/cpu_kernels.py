"""The optimizers' ``fused="numba"`` path: each tensor's update in single passes on a CPU, compiled by numba.

On a CPU an optimizer step is bound by memory traffic, and torch's eager
ops pay one trip through memory per op. Two costs remain even on the
default ``fused=True`` path (measured by ``benchmarks/torch_optimizers.py``):
torch's norms read one array at a time, one memory stream, which on this
machine moves about half the bytes per second of a two-stream add; and LAMB,
which no torch kernel computes, runs a dozen foreach ops per chunk. The loops
in :mod:`hvd_largebatch.torch_impl.numba_kernels` do

* the non-finite check's ``||g||`` and LARS's ``||w||`` in one loop over
  both (SGD and LAMB: ``||g||`` reading the two halves of ``g`` side by side);
* the SGD/LARS/LARC/CLARS update of a tensor in one loop (read ``w``, ``g``,
  ``v``; write ``v``, ``w``), Nesterov included;
* LAMB in two loops per tensor: the moments with ``||w||`` and ``||u||``
  (``u`` is not stored), then the step with the trust ratio, computing ``u``
  again from ``mu``, ``nu`` and ``w``.

Each loop walks a whole table of tensors (their addresses and sizes) in one
compiled call: per-tensor calls from Python would cost about two passes over
ResNet-50's 161 tensors.

That is the pass count of each optimizer's bandwidth floor. The arithmetic is
in the tensor's dtype; it differs from the single-tensor path only in
rounding (sums reassociated, multiply-adds fused).

Served: CPU tensors of dtype float32 or float64 whose state is laid out
alike (contiguous). Any other tensor takes the path ``fused=True`` takes.
The loops are single-threaded, for runs with one intra-op thread per process
(as ``horovodrun`` with one process per core); with several threads torch's
own kernels can use the other cores. So ``fused=None`` (the default) takes
them when numba imports, torch runs one intra-op thread and the group holds
a CPU tensor (:func:`default_on`); ``fused="numba"`` asks for them in any
case, ``fused=True`` never. numba is optional: ``pip install numba`` (pinned
in ``requirements.txt``). The first call per dtype compiles for a few
seconds; the machine code is cached on disk, so later processes load it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable, Sequence
from types import ModuleType

import numpy as np
import torch

from hvd_largebatch.torch_impl.tensor_lists import tensor_norms

__all__ = ["NUMBA", "require", "default_on", "serves", "numpy_dtype", "table", "addresses", "grad_norms", "weight_and_grad_norms"]

#: The value of the optimizers' ``fused`` switch that selects these loops.
NUMBA = "numba"

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def require() -> ModuleType:
    """The compiled loops' module; ImportError naming the switch and the install when numba is missing."""
    try:
        return importlib.import_module("hvd_largebatch.torch_impl.numba_kernels")
    except ImportError as error:
        raise ImportError(
            f"fused='numba' needs the numba package (pip install numba; requirements.txt pins the tested "
            f"version); pass fused=True for torch's kernels instead ({error})"
        ) from error


@functools.cache
def _importable() -> bool:
    try:
        require()
    except ImportError:
        return False
    return True


def default_on(params: Iterable[torch.Tensor]) -> bool:
    """Whether ``fused=None`` takes the loops for a group of ``params``.

    Yes when torch runs one intra-op thread (the loops use one core; with
    more, torch's kernels spread a step over them), a parameter lives on the
    CPU and numba imports (checked once per process; without it the default
    is torch's kernels, silently).
    """
    return torch.get_num_threads() == 1 and any(p.is_cpu for p in params) and _importable()


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the loops can update these tensors: all on the CPU, one dtype (float32 or float64), contiguous."""
    dtype = tensors[0].dtype
    if dtype not in _NUMPY_DTYPES:
        return False
    for t in tensors:  # a plain loop: this runs for every tensor of every step
        if not (t.is_cpu and t.dtype == dtype and t.is_contiguous()):
            return False
    return True


def numpy_dtype(dtype: torch.dtype) -> type:
    """The NumPy scalar type of a served dtype (the loops' per-tensor scalars are arrays of it)."""
    return _NUMPY_DTYPES[dtype]


def addresses(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """The data addresses of served tensors, one int64 per tensor (they must stay alive during the call)."""
    return np.fromiter((t.data_ptr() for t in tensors), dtype=np.int64, count=len(tensors))


def table(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """``(addresses, sizes)`` of served tensors: the table the loops walk."""
    return addresses(tensors), np.fromiter((t.numel() for t in tensors), dtype=np.int64, count=len(tensors))


def _served_by_dtype(columns: Sequence[Sequence[torch.Tensor]]) -> tuple[dict[torch.dtype, list[int]], list[int]]:
    # Positions whose tensors (one from each column) the loops serve, by dtype; and the rest.
    served: dict[torch.dtype, list[int]] = {}
    rest = []
    for i, tensors in enumerate(zip(*columns)):
        if serves(*tensors):
            served.setdefault(tensors[0].dtype, []).append(i)
        else:
            rest.append(i)
    return served, rest


def grad_norms(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``||g||`` of each gradient as 0-d tensors; the loops serve what they can, torch the rest."""
    kernels = require()
    norms: list[torch.Tensor] = [None] * len(grads)  # type: ignore[list-item]
    served, rest = _served_by_dtype([grads])
    for dtype, positions in served.items():
        sums = np.empty(len(positions), dtype=numpy_dtype(dtype))
        kernels.sums_of_squares(*table([grads[i] for i in positions]), sums)
        for i, norm in zip(positions, torch.from_numpy(sums).sqrt_().unbind()):
            norms[i] = norm
    for i, norm in zip(rest, tensor_norms([grads[i] for i in rest])):
        norms[i] = norm
    return norms


def weight_and_grad_norms(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(||w||, ||g||)`` of each tensor, each pair read in one loop where the loops serve both tensors."""
    kernels = require()
    w_norms: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
    g_norms: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
    served, rest = _served_by_dtype([params, grads])
    for dtype, positions in served.items():
        w_sums, g_sums = (np.empty(len(positions), dtype=numpy_dtype(dtype)) for _ in range(2))
        w_addresses, sizes = table([params[i] for i in positions])
        kernels.paired_sums_of_squares(w_addresses, addresses([grads[i] for i in positions]), sizes, w_sums, g_sums)
        for i, w_norm, g_norm in zip(positions, torch.from_numpy(w_sums).sqrt_().unbind(),
                                     torch.from_numpy(g_sums).sqrt_().unbind()):
            w_norms[i], g_norms[i] = w_norm, g_norm
    for i, w_norm, g_norm in zip(rest, tensor_norms([params[i] for i in rest]),
                                 tensor_norms([grads[i] for i in rest])):
        w_norms[i], g_norms[i] = w_norm, g_norm
    return w_norms, g_norms
