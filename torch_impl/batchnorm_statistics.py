"""``average_batchnorm_statistics``: make every rank's BatchNorm running statistics the mean over ranks.

Horovod averages gradients, not buffers: each rank's BatchNorm layers keep
running statistics of their own shard, so the ranks' ``running_mean`` and
``running_var`` drift apart while their weights stay identical. Evaluation or
a checkpoint written by rank 0 then sees one rank's estimate only. Calling
:func:`average_batchnorm_statistics` before evaluating or saving replaces, on
every rank, each BatchNorm layer's

* ``running_mean`` by ``(1/k) * sum_r running_mean_r``,
* ``running_var`` by ``(1/k) * sum_r running_var_r`` (the mean of the ranks'
  estimates, not the variance of the pooled data, which would add the spread
  of the ranks' means),
* ``num_batches_tracked`` by the mean over ranks rounded to an integer (equal
  on every rank; with data-parallel training every rank counts the same),

over the ``k`` Horovod processes, with one allreduce for the whole model.

The alternative is ``horovod.torch.SyncBatchNorm``, which synchronises the
batch statistics inside every training forward pass (exact global-batch
statistics, an allreduce per BatchNorm layer per step); this helper costs
one allreduce when you call it and leaves training untouched. The Keras twin
is ``hvd_largebatch.tf.average_batchnorm_statistics``.
"""

from __future__ import annotations

import torch

from hvd_largebatch.torch_impl.distributed import _horovod

__all__ = ["average_batchnorm_statistics"]


def _running_statistics(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, buffer)`` of every BatchNorm running statistic, in ``named_modules`` order."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.modules.batchnorm._NormBase) or not module.track_running_stats:
            continue
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            buffer = getattr(module, key, None)
            if buffer is not None:
                found.append((f"{name}.{key}" if name else key, buffer))
    return found


def average_batchnorm_statistics(model: torch.nn.Module) -> int:
    """Replaces every BatchNorm layer's running statistics by their mean over the Horovod ranks (see the module doc).

    Call it on every rank, e.g. before evaluation or before rank 0 saves a
    checkpoint. BatchNorm1d/2d/3d, ``SyncBatchNorm`` and the layers inside
    ``DualBatchNorm`` are covered; layers built with
    ``track_running_stats=False`` have nothing to average.

    Args:
        model: the module whose BatchNorm buffers are averaged in place.

    Returns:
        The number of BatchNorm layers averaged (0 leaves the model untouched).

    Raises:
        ValueError: naming ``model`` when it is not a ``torch.nn.Module``.
        HorovodNotInitialisedError: when ``hvd.init()`` was not called.

    Example (under ``horovodrun``, after ``hvd.init()``)::

        average_batchnorm_statistics(model)
        model.eval()
        accuracy = evaluate(model, val_loader)
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hvd = _horovod()
    statistics = _running_statistics(model)
    layers = sum(1 for name, _ in statistics if name.endswith("running_mean"))
    if not statistics or hvd.size() == 1:
        return layers
    device = statistics[0][1].device
    flat = torch.cat([buffer.detach().reshape(-1).to(device, torch.float64) for _, buffer in statistics])
    mean = hvd.allreduce(flat, op=hvd.Average, name="hvd_largebatch.batchnorm_statistics")
    offset = 0
    with torch.no_grad():
        for _, buffer in statistics:
            part = mean[offset:offset + buffer.numel()].reshape(buffer.shape)
            offset += buffer.numel()
            if not buffer.is_floating_point():
                part = torch.round(part)
            buffer.copy_(part.to(buffer.device, buffer.dtype))
    return layers
