"""Large-batch training of a 1-D CNN on MNIST-1D with Horovod and hvd_largebatch (PyTorch).

By default: LARS with Goyal et al.'s per-iteration gradual warmup, i.e. the
base LR tuned at batch 128 scaled to the global batch (square-root rule for the
layer-wise optimizers, Goyal's linear rule for ``--optimizer sgd``), a ramp from
the base LR to that peak over the first epoch, then the LARS paper's poly(2)
decay (``sgd``: Goyal's step decay). Gradients are averaged over the workers by
Horovod's allreduce; rank 0's initial weights and optimizer state are broadcast
to every worker.

Model and training loop are written here with the package's public API;
``mnist1d_recipe.py``, in this folder too, gives the options, the data (from the ``mnist1d``
package's generator, never downloaded) and the schedule, the same as the Keras example's.

Run on 2 local workers:

    horovodrun -np 2 -H localhost:2 python examples/torch_mnist1d.py
    horovodrun -np 2 -H localhost:2 python examples/torch_mnist1d.py --optimizer lamb --batch-size 8192
    horovodrun -np 2 -H localhost:2 python examples/torch_mnist1d.py --smoke      # seconds, tiny data

Only rank 0 prints.
"""

from __future__ import annotations

import math
import sys
import time

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hvd_largebatch.torch_impl import DistributedOptimizer, GradualWarmupScheduler, broadcast_state, create_optimizer
from mnist1d_recipe import check_batch_size, load_mnist1d, lr_schedule, parse_args, weight_decay

def mnist1d_convnet() -> nn.Sequential:
    """Three Conv1d-BatchNorm-ReLU blocks (32, 64, 64 channels; length 40 -> 40 -> 20 -> 10) and a classifier."""
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 40))]
    for c_in, c_out, kernel, stride in ((1, 32, 5, 1), (32, 64, 3, 2), (64, 64, 3, 2)):
        layers += [nn.Conv1d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm1d(c_out),
                   nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 10, 10))


def shard_indices(num_examples: int, global_batch: int, epoch: int, seed: int, rank: int, workers: int):
    """This worker's example indices for every step of ``epoch``: its share of each global batch.

    All workers draw the same epoch order (seeded by ``seed`` and ``epoch``), cut it into global
    batches and take their own slice of each, so together they train on exactly the global batch.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    steps, per_worker = num_examples // global_batch, global_batch // workers
    batches = order[: steps * global_batch].reshape(steps, workers, per_worker)
    return batches[:, rank]


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Test loss and accuracy over all workers: each scores its part, one allreduce sums the counts."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        sums = torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum().float(),
                            torch.tensor(float(len(y)))])
    sums = hvd.allreduce(sums, op=hvd.Sum, name="evaluate")
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def main() -> int:
    args = parse_args(__doc__.split("\n\n")[0])
    hvd.init()
    rank, workers = hvd.rank(), hvd.size()
    log = print if rank == 0 else (lambda *a, **k: None)

    check_batch_size(args, workers)
    # Data: the whole training set and this rank's part of the test set; rank 0 generates and caches them first.
    x_train, y_train, x_test, y_test = map(torch.from_numpy, load_mnist1d(args, rank, workers, barrier=hvd.barrier))
    steps_per_epoch, per_worker_batch = args.train_size // args.batch_size, args.batch_size // workers

    # Model, optimizer and schedule, as the large-batch papers do it.
    torch.manual_seed(args.seed)
    model = mnist1d_convnet()
    schedule = lr_schedule(args, steps_per_epoch)  # gradual warmup, then poly(2) (sgd: Goyal's steps)
    optimizer = create_optimizer(
        args.optimizer, model.named_parameters(), lr=schedule(0), weight_decay=weight_decay(args)
    )
    optimizer = DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    scheduler = GradualWarmupScheduler(optimizer, schedule)
    broadcast_state(model, optimizer, root_rank=0)

    log(f"{args.optimizer} on {workers} workers: global batch {args.batch_size} "
        f"({per_worker_batch} per worker, {steps_per_epoch} steps/epoch); {schedule.describe()}")
    for epoch in range(args.epochs):
        model.train()
        started, loss_sum = time.perf_counter(), 0.0
        for indices in shard_indices(args.train_size, args.batch_size, epoch, args.seed, rank, workers):
            index = torch.from_numpy(indices)
            x, y = x_train[index], y_train[index]
            optimizer.zero_grad()
            if args.optimizer == "clars":  # the training pass, and the per-example gradient norms CLARS divides by
                loss = optimizer.forward_backward(model, F.cross_entropy, x, y)
            else:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
        train_loss = hvd.allreduce(torch.tensor(loss_sum / steps_per_epoch), name="train_loss").item()
        test_loss, test_accuracy = evaluate(model, x_test, y_test)
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
            f"test accuracy {100 * test_accuracy:.2f}%, lr {optimizer.param_groups[0]['lr']:.4g}, "
            f"{time.perf_counter() - started:.1f} s")
    log(f"final test accuracy {100 * test_accuracy:.2f}%")
    return 0 if math.isfinite(train_loss) else 1


if __name__ == "__main__":
    sys.exit(main())
