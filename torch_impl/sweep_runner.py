"""PyTorch cell runner of ``hvd-largebatch bench``: trains one sweep cell under Horovod.

:func:`train_cell` is an ordinary Horovod training loop written with the
package's public API, the way a user would write it: the optimizer from
:func:`~hvd_largebatch.torch_impl.create_optimizer` wrapped in
:func:`~hvd_largebatch.torch_impl.DistributedOptimizer`, the LR set every
iteration by :class:`~hvd_largebatch.torch_impl.GradualWarmupScheduler` from
the cell's core schedule, weights and optimizer state broadcast from rank 0 by
:func:`~hvd_largebatch.torch_impl.broadcast_state`, CLARS fed its per-example
norms with ``add_grad_norms``, and ConAdv through
:class:`~hvd_largebatch.torch_impl.conadv.ConAdv` with dual BatchNorm. Each
rank trains on its shard of the global batch
(:class:`hvd_largebatch.data.ShardedBatches`) and evaluates a disjoint part of
the test set; the sums are combined with one allreduce.

:class:`HorovodCellRunner` is what :mod:`hvd_largebatch.bench_worker` loads
(``hvd.init()`` happens in its constructor).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hvd_largebatch.data import MNIST1D, ShardedBatches, shard_of
from hvd_largebatch.recipes import CellPlan
from hvd_largebatch.torch_impl import (
    DistributedOptimizer,
    GradualWarmupScheduler,
    broadcast_state,
    create_optimizer,
)
from hvd_largebatch.torch_impl import core_spelling
from hvd_largebatch.torch_impl.models import MNIST1DConvNet

__all__ = ["HorovodCellRunner", "train_cell", "evaluate"]

_EVAL_CHUNK = 2048


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, hvd: Any) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` over every rank's part of the test set (one allreduce of sums)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(x), _EVAL_CHUNK):
            logits = model(x[start : start + _EVAL_CHUNK])
            labels = y[start : start + _EVAL_CHUNK]
            totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            totals[1] += (logits.argmax(dim=1) == labels).sum().double()
            totals[2] += len(labels)
    totals = hvd.allreduce(totals, op=hvd.Sum, name="bench.evaluate")
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def _batches(x: torch.Tensor, y: torch.Tensor, shards: ShardedBatches, epoch: int) -> Iterator[tuple]:
    for indices in shards.epoch_indices(epoch):
        index = torch.from_numpy(indices)
        yield x[index], y[index]


def train_cell(
    plan: CellPlan,
    data: MNIST1D,
    hvd: Any,
    on_epoch: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Trains ``plan`` on this rank (every rank calls it) and returns the cell's result.

    Args:
        plan: the cell (optimizer record, schedule, ConAdv settings, batch, epochs, seed).
        data: MNIST-1D (the same arrays on every rank).
        hvd: the initialised ``horovod.torch`` module.
        on_epoch: called after each epoch with that epoch's report (rank 0 prints it).

    Returns:
        ``test_accuracy``, ``test_loss``, ``train_loss`` (last epoch, mean over
        steps and ranks of the optimised loss: for ConAdv, clean + adversarial), ``history`` (per epoch), ``seconds``
        (training and evaluation wall time), ``skipped_steps`` (non-finite
        gradients skipped by the optimizer).

    Raises:
        ValueError: when ``plan`` was made for another world size.
    """
    rank, size = hvd.rank(), hvd.size()
    if plan.world_size != size:
        raise ValueError(f"plan.world_size={plan.world_size} but Horovod runs {size} processes")
    torch.manual_seed(plan.seed)
    model = MNIST1DConvNet()
    if plan.conadv is not None and plan.conadv["dual_bn"]:
        from hvd_largebatch.torch_impl.dual_bn import convert_to_dual_bn

        model = convert_to_dual_bn(model)  # before building the optimizer
    schedule = plan.schedule
    optimizer = create_optimizer(
        plan.optimizer, model.named_parameters(), lr=schedule(0),
        **core_spelling.to_torch(plan.optimizer_args()),
    )
    optimizer = DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    scheduler = GradualWarmupScheduler(optimizer, schedule)
    broadcast_state(model, optimizer, root_rank=0)
    conadv = None
    if plan.conadv is not None:
        from hvd_largebatch.torch_impl.conadv import ConAdv

        # Rank-dependent seed: each rank draws its own random starts and target labels.
        conadv = ConAdv(model, F.cross_entropy, seed=plan.seed * 1000 + rank, **plan.conadv)
    needs_norms = hasattr(optimizer, "add_grad_norms")  # CLARS measures per-example gradient norms

    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test = torch.from_numpy(shard_of(data.x_test, rank, size))
    y_test = torch.from_numpy(shard_of(data.y_test, rank, size))
    shards = ShardedBatches(len(x_train), plan.global_batch, rank, size, plan.seed)

    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for epoch in range(plan.epochs):
            epoch_start = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64)
            batches: Iterator = _batches(x_train, y_train, shards, epoch)
            steps = conadv.lookahead(batches) if conadv is not None else ((b, None) for b in batches)
            for (x, y), ahead in steps:
                optimizer.zero_grad()
                loss = conadv.loss(x, y, ahead) if conadv is not None else F.cross_entropy(model(x), y)
                loss.backward()
                if needs_norms:
                    optimizer.add_grad_norms(model, F.cross_entropy, x, y)
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach().double()
            lr = optimizer.param_groups[0]["lr"]
            train_loss = float(hvd.allreduce(loss_sum / shards.steps_per_epoch, op=hvd.Average, name="bench.loss"))
            test_loss, test_accuracy = evaluate(model, x_test, y_test, hvd)
            report = {
                "epoch": epoch + 1,
                "epochs": plan.epochs,
                "train_loss": train_loss,
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "lr": lr,
                "seconds": time.perf_counter() - epoch_start,
            }
            history.append(report)
            if on_epoch is not None:
                on_epoch(report)
    finally:
        if conadv is not None:
            conadv.close()
    last = history[-1]
    return {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "train_loss": last["train_loss"],
        "history": history,
        "seconds": time.perf_counter() - started,
        "skipped_steps": int(getattr(optimizer, "skipped_steps", 0)),
        "framework_versions": {"torch": torch.__version__, "horovod": _horovod_version(), "numpy": np.__version__},
    }


def _horovod_version() -> str:
    import horovod

    return horovod.__version__


class HorovodCellRunner:
    """The cell runner :mod:`hvd_largebatch.bench_worker` uses: ``hvd.init()``, broadcast, :func:`train_cell`."""

    def __init__(self) -> None:
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()

    def broadcast_object(self, value: Any) -> Any:
        return self.hvd.broadcast_object(value, root_rank=0, name="hvd_largebatch.bench.job")

    def run_cell(
        self, plan: CellPlan, data: MNIST1D, on_epoch: Callable[[Mapping[str, Any]], None] | None
    ) -> dict[str, Any]:
        return train_cell(plan, data, self.hvd, on_epoch)
