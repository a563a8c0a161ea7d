"""What the two MNIST-1D examples share: their command line, their data and their LR recipe.

``torch_mnist1d.py`` and ``keras_mnist1d.py`` import this file from their own
folder (Python puts a script's folder first on ``sys.path``), so each still runs
as ``python examples/<script>.py``. It uses only the package's public API:

* :func:`parse_args`: the options both scripts take (``--smoke`` shrinks the run),
  and :func:`check_batch_size`;
* :func:`mnist1d`: MNIST-1D from the ``mnist1d`` package's own generator,
  generated once into ``--data-dir``, never downloaded; :func:`load_mnist1d`
  gives each rank the training set and its part of the test set;
* :func:`lr_schedule`: the base LR tuned at batch 128 scaled to the global batch
  (square-root rule for the layer-wise optimizers, Goyal's linear rule for
  ``sgd``), a per-iteration ramp from the base LR to that peak, then the LARS
  paper's poly(2) decay (``sgd``: Goyal's step decay);
* :func:`weight_decay`: ``--weight-decay``, or the default of the optimizer.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np

from hvd_largebatch import schedules

__all__ = [
    "BASE_LR", "BASE_BATCH", "parse_args", "check_batch_size", "mnist1d", "load_mnist1d", "lr_schedule", "weight_decay",
]

# Base LRs at batch 128, as tuned for `hvd-largebatch bench` (LARC uses LARS's).
BASE_LR = {"lars": 8.0, "larc": 8.0, "clars": 8.0, "lamb": 0.02, "sgd": 0.1}
BASE_BATCH = 128


def parse_args(description: str) -> argparse.Namespace:
    """The examples' options; ``--smoke`` means 3 epochs of batch 256 on 2,048 / 512 examples."""
    parser = argparse.ArgumentParser(description=description)
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


def check_batch_size(args: argparse.Namespace, workers: int) -> None:
    """Exits with a message unless ``--batch-size`` splits evenly over ``workers`` and fits in ``--train-size``."""
    if args.batch_size % workers or not 0 < args.batch_size <= args.train_size:
        raise SystemExit(f"--batch-size must be a multiple of {workers} workers and at most --train-size")


def mnist1d(train_size: int, test_size: int, data_dir: str) -> tuple[np.ndarray, ...]:
    """MNIST-1D (signals of length 40, 10 classes) from the mnist1d package's generator, cached as a pickle.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 signals ``(N, 40)`` and int64 labels.
    """
    from mnist1d.data import get_dataset, get_dataset_args

    args = get_dataset_args()
    args.num_samples = -(-(train_size + test_size) // 10) * 10  # the generator makes num_samples/10 per class
    args.train_split = 1.0  # split exactly below
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"mnist1d-{args.num_samples}-seed{args.seed}.pkl")
    data = get_dataset(args, path=path, download=False, verbose=False)
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    return x[:train_size], y[:train_size], x[train_size:train_size + test_size], y[train_size:train_size + test_size]


def load_mnist1d(
    args: argparse.Namespace, rank: int, workers: int, barrier: Callable[[], object]
) -> tuple[np.ndarray, ...]:
    """The whole training set and this rank's part of the test set (every ``workers``-th example from ``rank``).

    Rank 0 generates and caches the data first; ``barrier()`` (Horovod's, called on
    every rank) makes the others wait for its cache file.
    """
    if rank == 0:
        mnist1d(args.train_size, args.test_size, args.data_dir)
    barrier()
    x_train, y_train, x_test, y_test = mnist1d(args.train_size, args.test_size, args.data_dir)
    return x_train, y_train, x_test[rank::workers], y_test[rank::workers]


def lr_schedule(args: argparse.Namespace, steps_per_epoch: int) -> schedules.Schedule:
    """The run's LR at every step, as the large-batch papers set it (see the module docstring)."""
    base_lr = args.base_lr if args.base_lr is not None else BASE_LR[args.optimizer]
    if args.optimizer == "sgd":
        # Goyal et al.: linear scaling, gradual warmup from the base LR, step decay at Goyal's
        # epochs 30, 60, 80 of 90 taken as fractions of this run (those after the warmup).
        milestones = [f * args.epochs for f in (1 / 3, 2 / 3, 8 / 9) if f * args.epochs > args.warmup_epochs]
        return schedules.goyal(
            base_lr, BASE_BATCH, args.batch_size, steps_per_epoch, epochs=args.epochs,
            warmup_epochs=args.warmup_epochs, milestones=milestones,
        )
    # Layer-wise methods: the same gradual warmup (Goyal's per-iteration ramp from the base
    # LR), square-root scaling and the LARS paper's poly(2) decay, as in `hvd-largebatch bench`.
    return schedules.lars_poly(
        base_lr, BASE_BATCH, args.batch_size, steps_per_epoch, args.epochs,
        warmup_epochs=args.warmup_epochs, scaling="sqrt",
    )


def weight_decay(args: argparse.Namespace) -> float:
    """``--weight-decay``, by default 0.01 for LAMB and 5e-4 for the others."""
    if args.weight_decay is not None:
        return args.weight_decay
    return 0.01 if args.optimizer == "lamb" else 5e-4
