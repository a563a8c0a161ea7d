"""How the optimizers' foreach path splits lists of tensors: by device and dtype, then into cache-sized chunks.

``torch._foreach_*`` kernels need every list on one device with one dtype, so
a parameter group is first bucketed by ``(device, dtype)``. On a CPU each
bucket is then cut into consecutive chunks of at most
:data:`CPU_CHUNK_NUMEL` elements (a tensor larger than that is a chunk of its
own): running all the foreach ops of one update over a chunk while its
parameters, gradients and state are still in the last-level cache moves far
fewer bytes through main memory than streaming every op over the whole model
(measured by ``benchmarks/torch_optimizers.py``). On accelerators the whole
bucket is one chunk, since their foreach kernels fuse many tensors per launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CPU_CHUNK_NUMEL", "group_by_device_and_dtype", "cache_sized_chunks", "tensor_norms", "scalar_or_list"]

#: Elements per chunk on a CPU: 2**19 float32 values are 2 MiB per tensor
#: list, so parameters, gradients, state and one temporary fit in L3 together.
CPU_CHUNK_NUMEL = 2**19

#: The norms of half-precision tensors are accumulated in float32 (None: the tensor's own dtype).
_HALF_NORM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def group_by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions of ``tensors`` bucketed by ``(device, dtype)``, in first-seen order, each in list order."""
    buckets: dict[tuple[torch.device | None, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        # is_cpu is cheaper than building a torch.device for every tensor of every step
        buckets.setdefault((None if tensor.is_cpu else tensor.device, tensor.dtype), []).append(index)
    return list(buckets.values())


def cache_sized_chunks(tensors: Sequence[torch.Tensor], chunk_numel: int | None = None) -> list[slice]:
    """Consecutive slices of ``tensors`` (one device and dtype) for the foreach path.

    Args:
        tensors: the bucket's tensors, all on one device.
        chunk_numel: the chunk budget in elements; None picks
            :data:`CPU_CHUNK_NUMEL` on a CPU and no chunking elsewhere.

    Returns:
        Slices covering ``range(len(tensors))`` in order. A chunk closes as
        soon as it holds at least one tensor and adding the next would exceed
        the budget.
    """
    if not tensors:
        return []
    if chunk_numel is None:
        chunk_numel = CPU_CHUNK_NUMEL if tensors[0].device.type == "cpu" else 0
    if chunk_numel <= 0:
        return [slice(0, len(tensors))]
    chunks, start, filled = [], 0, 0
    for index, tensor in enumerate(tensors):
        numel = tensor.numel()
        if index > start and filled + numel > chunk_numel:
            chunks.append(slice(start, index))
            start, filled = index, 0
        filled += numel
    chunks.append(slice(start, len(tensors)))
    return chunks


def tensor_norms(tensors: Sequence[torch.Tensor], foreach: bool = True) -> list[torch.Tensor]:
    """``||t||`` (L2 over the whole tensor) of each tensor as 0-d tensors on its device.

    With ``foreach``, one ``torch._foreach_norm`` per device/dtype bucket (a
    single read of every tensor); otherwise ``torch.linalg.vector_norm`` per tensor.
    The norm of a float16/bfloat16 tensor is accumulated and returned in
    float32, so a finite gradient's norm does not overflow float16 (65504).
    """
    if not foreach:
        return [torch.linalg.vector_norm(t, dtype=_HALF_NORM_DTYPE.get(t.dtype)) for t in tensors]
    norms: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for bucket in group_by_device_and_dtype(tensors):
        dtype = _HALF_NORM_DTYPE.get(tensors[bucket[0]].dtype)
        for i, norm in zip(bucket, torch._foreach_norm([tensors[i] for i in bucket], 2, dtype=dtype)):
            norms[i] = norm
    return norms


def scalar_or_list(values: list[float]) -> float | list[float]:
    """One scalar when every value is equal (``torch._foreach_*`` takes its fast scalar path), else the list."""
    return values[0] if all(v == values[0] for v in values) else values
