"""Large-batch training of a 1-D CNN on MNIST-1D with Horovod and hvd_largebatch (PyTorch).

By default: LARS with Goyal et al.'s per-iteration gradual warmup, i.e. the
base LR tuned at batch 128 scaled to the global batch (square-root rule for the
layer-wise optimizers, Goyal's linear rule for ``--optimizer sgd``), a ramp from
the base LR to that peak over the first epoch, then the LARS paper's poly(2)
decay (``sgd``: Goyal's step decay). Gradients are averaged over the workers by
Horovod's allreduce; rank 0's initial weights and optimizer state are broadcast
to every worker.

The script uses only the package's public API; the data come from the
``mnist1d`` package's own generator (rank 0 generates them once into
``--data-dir``, never downloads), and the model is defined here.

Run on 2 local workers:

    horovodrun -np 2 -H localhost:2 python examples/torch_mnist1d.py
    horovodrun -np 2 -H localhost:2 python examples/torch_mnist1d.py --optimizer lamb --batch-size 8192
    horovodrun -np 2 -H localhost:2 python examples/torch_mnist1d.py --smoke      # seconds, tiny data

Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hvd_largebatch import schedules
from hvd_largebatch.torch_impl import DistributedOptimizer, GradualWarmupScheduler, broadcast_state, create_optimizer

# Base LRs at batch 128, as tuned for `hvd-largebatch bench` (LARC uses LARS's).
BASE_LR = {"lars": 8.0, "larc": 8.0, "clars": 8.0, "lamb": 0.02, "sgd": 0.1}
BASE_BATCH = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=tuple(BASE_LR), default="lars", help="default: lars")
    parser.add_argument("--batch-size", type=int, default=2048, help="global batch (all workers), default: 2048")
    parser.add_argument("--epochs", type=int, default=10, help="default: 10")
    parser.add_argument("--base-lr", type=float, default=None, help=f"LR at batch {BASE_BATCH} (default: tuned)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="gradual warmup length, default: 1")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (LAMB: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=60_000, help="MNIST-1D training examples, default: 60000")
    parser.add_argument("--test-size", type=int, default=10_000, help="MNIST-1D test examples, default: 10000")
    parser.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "mnist1d"),
                        help="where the generated MNIST-1D is kept, default: ~/.cache/mnist1d")
    parser.add_argument("--smoke", action="store_true", help="tiny data, 3 epochs, batch 256: checks that it all runs")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.batch_size, args.warmup_epochs = 3, 256, 0.5
        args.train_size, args.test_size = 2048, 512
    return args


def mnist1d(train_size: int, test_size: int, data_dir: str) -> tuple[np.ndarray, ...]:
    """MNIST-1D (signals of length 40, 10 classes) from the mnist1d package's generator, cached as a pickle."""
    from mnist1d.data import get_dataset, get_dataset_args

    args = get_dataset_args()
    args.num_samples = -(-(train_size + test_size) // 10) * 10  # the generator makes num_samples/10 per class
    args.train_split = 1.0  # split exactly below
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"mnist1d-{args.num_samples}-seed{args.seed}.pkl")
    data = get_dataset(args, path=path, download=False, verbose=False)
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    return x[:train_size], y[:train_size], x[train_size:train_size + test_size], y[train_size:train_size + test_size]


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
    args = parse_args()
    hvd.init()
    rank, workers = hvd.rank(), hvd.size()
    log = print if rank == 0 else (lambda *a, **k: None)

    if args.batch_size % workers or not 0 < args.batch_size <= args.train_size:
        raise SystemExit(f"--batch-size must be a multiple of {workers} workers and at most --train-size")
    # Data: every rank holds the same arrays; rank 0 generates and caches them first.
    if rank == 0:
        mnist1d(args.train_size, args.test_size, args.data_dir)
    hvd.barrier()
    x_train, y_train, x_test, y_test = map(torch.from_numpy, mnist1d(args.train_size, args.test_size, args.data_dir))
    x_test, y_test = x_test[rank::workers], y_test[rank::workers]  # each rank scores its part of the test set
    steps_per_epoch, per_worker_batch = args.train_size // args.batch_size, args.batch_size // workers

    # Model, optimizer and schedule, as the large-batch papers do it.
    torch.manual_seed(args.seed)
    model = mnist1d_convnet()
    base_lr = args.base_lr if args.base_lr is not None else BASE_LR[args.optimizer]
    if args.optimizer == "sgd":
        # Goyal et al.: linear scaling, gradual warmup from the base LR, step decay at Goyal's
        # epochs 30, 60, 80 of 90 taken as fractions of this run (those after the warmup).
        milestones = [f * args.epochs for f in (1 / 3, 2 / 3, 8 / 9) if f * args.epochs > args.warmup_epochs]
        schedule = schedules.goyal(
            base_lr, BASE_BATCH, args.batch_size, steps_per_epoch, epochs=args.epochs,
            warmup_epochs=args.warmup_epochs, milestones=milestones,
        )
    else:
        # Layer-wise methods: the same gradual warmup (Goyal's per-iteration ramp from the base
        # LR), square-root scaling and the LARS paper's poly(2) decay, as in `hvd-largebatch bench`.
        schedule = schedules.lars_poly(
            base_lr, BASE_BATCH, args.batch_size, steps_per_epoch, args.epochs,
            warmup_epochs=args.warmup_epochs, scaling="sqrt",
        )
    weight_decay = args.weight_decay if args.weight_decay is not None else (0.01 if args.optimizer == "lamb" else 5e-4)
    optimizer = create_optimizer(args.optimizer, model.named_parameters(), lr=schedule(0), weight_decay=weight_decay)
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
