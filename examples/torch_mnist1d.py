"""Large-batch training of a 1-D CNN on MNIST-1D with Horovod and hvd_largebatch (PyTorch).

By default: LARS with Goyal et al.'s per-iteration gradual warmup, i.e. the
base LR tuned at batch 128 scaled to the global batch (square-root rule for the
layer-wise optimizers, Goyal's linear rule for ``--optimizer sgd``), a ramp from
the base LR to that peak over the first epoch, then the LARS paper's poly(2)
decay (``sgd``: Goyal's step decay). Gradients are averaged over the workers by
Horovod's allreduce; rank 0's initial weights and optimizer state are broadcast
to every worker.

Run on 2 local workers (MNIST-1D is generated once and cached, never downloaded):

    horovodrun -np 2 -H localhost:2 python examples/torch_mnist1d.py
    horovodrun -np 2 -H localhost:2 python examples/torch_mnist1d.py --optimizer lamb --batch-size 8192
    horovodrun -np 2 -H localhost:2 python examples/torch_mnist1d.py --smoke      # seconds, tiny data

Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from hvd_largebatch import schedules
from hvd_largebatch.data import MNIST1DSpec, ShardedBatches, load_mnist1d, shard_of
from hvd_largebatch.recipes import BASE_LRS
from hvd_largebatch.torch_impl import DistributedOptimizer, GradualWarmupScheduler, broadcast_state, create_optimizer
from hvd_largebatch.torch_impl.models import MNIST1DConvNet

OPTIMIZERS = ("lars", "larc", "clars", "lamb", "sgd")
# Base LRs at batch 128, as tuned for `hvd-largebatch bench` (LARC uses LARS's).
BASE_LR = {name: BASE_LRS["lars" if name == "larc" else name] for name in OPTIMIZERS}
BASE_BATCH = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="lars", help="default: lars")
    parser.add_argument("--batch-size", type=int, default=2048, help="global batch (all workers), default: 2048")
    parser.add_argument("--epochs", type=int, default=10, help="default: 10")
    parser.add_argument("--base-lr", type=float, default=None, help=f"LR at batch {BASE_BATCH} (default: tuned)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="gradual warmup length, default: 1")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (LAMB: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch, batch 256: checks that it all runs")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.batch_size, args.warmup_epochs = 1, 256, 0.5
    return args


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
    args = parse_args()
    hvd.init()
    rank, workers = hvd.rank(), hvd.size()
    log = print if rank == 0 else (lambda *a, **k: None)

    # Data: every rank holds the same arrays; rank 0 generates and caches them first.
    spec = MNIST1DSpec(train_size=2048, test_size=512) if args.smoke else MNIST1DSpec()
    if rank == 0:
        load_mnist1d(spec, log=log)
    hvd.barrier()
    data = load_mnist1d(spec)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test = torch.from_numpy(shard_of(data.x_test, rank, workers))
    y_test = torch.from_numpy(shard_of(data.y_test, rank, workers))
    # Each step, rank r takes its part of one global batch; the epoch order is shared by all ranks.
    shards = ShardedBatches(len(x_train), args.batch_size, rank, workers, seed=args.seed)

    # Model, optimizer and schedule, as the large-batch papers do it.
    torch.manual_seed(args.seed)
    model = MNIST1DConvNet()
    base_lr = args.base_lr if args.base_lr is not None else BASE_LR[args.optimizer]
    if args.optimizer == "sgd":
        # Goyal et al.: linear scaling, gradual warmup from the base LR, step decay at Goyal's
        # epochs 30, 60, 80 of 90 taken as fractions of this run (those after the warmup).
        milestones = [f * args.epochs for f in (1 / 3, 2 / 3, 8 / 9) if f * args.epochs > args.warmup_epochs]
        schedule = schedules.goyal(
            base_lr, BASE_BATCH, args.batch_size, shards.steps_per_epoch, epochs=args.epochs,
            warmup_epochs=args.warmup_epochs, milestones=milestones,
        )
    else:
        # Layer-wise methods: the same gradual warmup (Goyal's per-iteration ramp from the base
        # LR), square-root scaling and the LARS paper's poly(2) decay, as in `hvd-largebatch bench`.
        schedule = schedules.lars_poly(
            base_lr, BASE_BATCH, args.batch_size, shards.steps_per_epoch, args.epochs,
            warmup_epochs=args.warmup_epochs, scaling="sqrt",
        )
    weight_decay = args.weight_decay if args.weight_decay is not None else (0.01 if args.optimizer == "lamb" else 5e-4)
    optimizer = create_optimizer(args.optimizer, model.named_parameters(), lr=schedule(0), weight_decay=weight_decay)
    optimizer = DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    scheduler = GradualWarmupScheduler(optimizer, schedule)
    broadcast_state(model, optimizer, root_rank=0)

    log(f"{args.optimizer} on {workers} workers: global batch {args.batch_size} "
        f"({shards.per_worker_batch} per worker, {shards.steps_per_epoch} steps/epoch); {schedule.describe()}")
    for epoch in range(args.epochs):
        model.train()
        started, loss_sum = time.perf_counter(), 0.0
        for indices in shards.epoch_indices(epoch):
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
        train_loss = hvd.allreduce(torch.tensor(loss_sum / shards.steps_per_epoch), name="train_loss").item()
        test_loss, test_accuracy = evaluate(model, x_test, y_test)
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
            f"test accuracy {100 * test_accuracy:.2f}%, lr {optimizer.param_groups[0]['lr']:.4g}, "
            f"{time.perf_counter() - started:.1f} s")
    log(f"final test accuracy {100 * test_accuracy:.2f}%")
    return 0 if math.isfinite(train_loss) else 1


if __name__ == "__main__":
    sys.exit(main())
