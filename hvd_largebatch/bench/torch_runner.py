"""PyTorch runner of ``hvd-largebatch bench``: trains one study run under Horovod.

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
(:class:`hvd_largebatch.bench.data.ShardedBatches`) and evaluates a disjoint part of
the validation and test splits; the sums are combined with one allreduce.
The study's measurements and stopping rule are
:class:`~hvd_largebatch.bench.run_monitor.RunMonitor`'s.

:class:`HorovodCellRunner` is what :mod:`hvd_largebatch.bench.worker` loads
(``hvd.init()`` happens in its constructor).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hvd_largebatch.bench.cell_runner import HorovodRunner, framework_versions, start_run, study_splits
from hvd_largebatch.bench.data import MNIST1D, ShardedBatches
from hvd_largebatch.bench.recipes import CellPlan
from hvd_largebatch.bench.torch_model import MNIST1DConvNet
from hvd_largebatch.torch_impl import (
    DistributedOptimizer,
    GradualWarmupScheduler,
    broadcast_state,
    core_spelling,
    create_optimizer,
)

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


def _squared_norm(tensors: Iterator[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for tensor in tensors:
        total += tensor.detach().double().pow(2).sum()
    return total


def train_cell(
    plan: CellPlan,
    data: MNIST1D,
    hvd: Any,
    on_epoch: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Trains one study run of ``plan`` on this rank (every rank calls it) and returns its result.

    The last ``plan.study["validation_size"]`` training examples are the
    validation split: the run is evaluated on it at the study's evaluation
    steps and stops as :class:`~hvd_largebatch.bench.run_monitor.RunMonitor`
    decides (target reached, diverged, or the horizon's last step). The test
    split is scored once, at the end.

    With more than one rank each step also measures the two squared gradient
    norms of the noise scale: a hook on every parameter adds up this rank's
    local gradient (before Horovod averages it in place), one allreduce
    averages ``[loss, |G_local|^2]`` over the ranks (the loss for the
    divergence rule), and the averaged gradient's norm is read between
    ``optimizer.synchronize()`` and the step (Horovod's
    ``skip_synchronize`` pattern).

    Args:
        plan: the run (optimizer record, schedule, ConAdv settings, batch, seed, ``study`` fields).
        data: MNIST-1D (the same arrays on every rank).
        hvd: the initialised ``horovod.torch`` module.
        on_epoch: called after each epoch with ``epoch``, ``step`` and the last validation accuracy.

    Returns:
        :meth:`RunMonitor.result`, plus ``seconds``, ``skipped_steps`` and ``framework_versions``.

    Raises:
        ValueError: when ``plan`` was made for another world size or is not a study run.
    """
    rank, size = hvd.rank(), hvd.size()
    monitor = start_run(plan, rank, size)
    torch.manual_seed(plan.seed)
    model = MNIST1DConvNet()
    if plan.conadv is not None and plan.conadv["dual_bn"]:
        from hvd_largebatch.torch_impl.dual_bn import convert_to_dual_bn

        model = convert_to_dual_bn(model)  # before building the optimizer
    schedule = plan.schedule
    optimizer = create_optimizer(
        plan.optimizer, model.named_parameters(), lr=schedule(0),
        **core_spelling.to_torch(plan.optimizer_args()), **plan.exclusions,
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
    measure_noise = monitor.noise is not None
    local_sq = torch.zeros((), dtype=torch.float64)
    hooks = []
    if measure_noise:
        def add_local(grad: torch.Tensor) -> None:
            local_sq.add_(grad.detach().double().pow(2).sum())

        hooks = [p.register_hook(add_local) for p in model.parameters() if p.requires_grad]

    x_train, y_train, x_val, y_val, x_test, y_test = map(torch.from_numpy, study_splits(plan, data, rank, size))
    shards = ShardedBatches(len(x_train), plan.global_batch, rank, size, plan.seed)
    skipped_before = int(getattr(optimizer, "skipped_steps", 0))

    started = time.perf_counter()
    try:
        for epoch in range(plan.epochs):
            model.train()
            batches: Iterator = _batches(x_train, y_train, shards, epoch)
            steps = conadv.lookahead(batches) if conadv is not None else ((b, None) for b in batches)
            for (x, y), ahead in steps:
                optimizer.zero_grad()
                local_sq.zero_()
                loss = conadv.loss(x, y, ahead) if conadv is not None else F.cross_entropy(model(x), y)
                loss.backward()
                local = local_sq.clone()
                if needs_norms:
                    optimizer.add_grad_norms(model, F.cross_entropy, x, y)
                big_sq = None
                if measure_noise:
                    optimizer.synchronize()
                    big_sq = float(_squared_norm(p.grad for p in model.parameters() if p.grad is not None))
                    with optimizer.skip_synchronize():
                        optimizer.step()
                else:
                    optimizer.step()
                scheduler.step()
                shared = torch.stack([loss.detach().double(), local])
                shared = hvd.allreduce(shared, op=hvd.Average, name="bench.step") if size > 1 else shared
                skipped = int(getattr(optimizer, "skipped_steps", 0)) > skipped_before
                if monitor.after_step(float(shared[0]), skipped, float(shared[1]) if measure_noise else None, big_sq):
                    break
                if monitor.wants_evaluation():
                    val_loss, val_accuracy = evaluate(model, x_val, y_val, hvd)
                    model.train()
                    if monitor.after_evaluation(val_accuracy, val_loss):
                        break
            if on_epoch is not None:
                last = monitor.trace[-1] if monitor.trace else [monitor.step, float("nan"), float("nan")]
                on_epoch({"epoch": epoch + 1, "epochs": plan.epochs, "step": monitor.step,
                          "validation_accuracy": last[1]})
            if monitor.stopped is not None:
                break
    finally:
        if conadv is not None:
            conadv.close()
        for hook in hooks:
            hook.remove()
    test_loss, test_accuracy = evaluate(model, x_test, y_test, hvd)
    return monitor.result(
        test_loss, test_accuracy,
        seconds=time.perf_counter() - started,
        skipped_steps=int(getattr(optimizer, "skipped_steps", 0)),
        framework_versions=framework_versions(torch=torch.__version__),
    )


class HorovodCellRunner(HorovodRunner):
    """The cell runner :mod:`hvd_largebatch.bench.worker` uses: ``hvd.init()``, broadcast, :func:`train_cell`."""

    def __init__(self) -> None:
        import horovod.torch as hvd

        super().__init__(hvd, train_cell, broadcast_name="hvd_largebatch.bench.job")
