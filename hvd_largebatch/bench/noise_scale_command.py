"""The ``hvd-largebatch noise-scale`` command: the gradient noise scale of the bench model, measured over training.

Trains the bench model (the MNIST-1D 1-D CNN) with this package's
``DistributedOptimizer`` under Horovod and a
:class:`hvd_largebatch.torch_impl.NoiseScaleMonitor`, and writes to ``--out``:

* ``noise_scale.csv``: per measured step the training loss, ``B_simple``,
  ``EMA(G2)``, ``EMA(S)`` and the single-step estimates;
* ``noise_scale.md``: a table of about 20 of those rows and the advice sentence
  for the run's global batch;
* ``noise_scale.png``: ``B_simple`` against step, with the global batch.

Example (shell)::

    hvd-largebatch noise-scale --global-batch 512 --epochs 3 --optimizer sgd --out results/noise_scale

It launches ``horovodrun -np W -H localhost:W --gloo`` itself (``--workers``,
default 2); started under ``horovodrun`` it runs in that launch. Frameworks
are imported only inside :func:`run`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hvd_largebatch.bench.data import DEFAULT_TRAIN_SIZE

__all__ = ["register", "run", "COLUMNS"]

#: The columns of ``noise_scale.csv``.
COLUMNS = ("step", "epoch", "train_loss", "b_simple", "g2", "s", "raw_g2", "raw_s")
OPTIMIZERS = ("sgd", "lars", "lamb")
TABLE_ROWS = 20
TEST_SIZE = 100


def register(subparsers: Any) -> None:
    """Adds the ``noise-scale`` sub-command to ``subparsers`` (see :mod:`hvd_largebatch.cli`)."""
    parser = subparsers.add_parser(
        "noise-scale",
        help="measure the gradient noise scale B_simple (critical batch) of the bench model over training",
        description=(
            "Trains the bench 1-D CNN on MNIST-1D under horovodrun with the NoiseScaleMonitor and writes "
            "noise_scale.csv, noise_scale.md (table and advice) and noise_scale.png (B_simple against step) to --out."
        ),
    )
    parser.add_argument("--global-batch", type=int, default=512, help="examples per update, all ranks, default: %(default)s")
    parser.add_argument("--epochs", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="default: sgd (momentum 0.9)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate, default: the bench recipe's base LR scaled linearly to --global-batch")
    parser.add_argument("--interval", type=int, default=1, help="measure every N steps, default: %(default)s")
    parser.add_argument("--ema-decay", type=float, default=0.99, help="default: %(default)s")
    parser.add_argument("--workers", type=int, default=2, help="Horovod processes on localhost, default: %(default)s")
    parser.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE, help="MNIST-1D training examples, default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--out", default="results/noise_scale", help="output directory, default: %(default)s")
    parser.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> None:
    from hvd_largebatch import config, noise_scale

    config.check_positive_int("--global-batch", args.global_batch)
    config.check_positive_int("--epochs", args.epochs)
    config.check_positive_int("--workers", args.workers)
    config.check_positive_int("--train-size", args.train_size)
    if args.train_size < args.global_batch:
        raise ValueError(f"--train-size must be at least --global-batch={args.global_batch}, got {args.train_size}")
    noise_scale.check_interval(args.interval, "--interval")
    noise_scale.check_ema_decay(args.ema_decay)
    if args.global_batch % args.workers:
        raise ValueError(f"--global-batch must be a multiple of --workers={args.workers}, got {args.global_batch}")
    if args.lr is not None:
        config.check_positive("--lr", args.lr)


def _inside_horovodrun() -> bool:
    return any(name in os.environ for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def run(args: argparse.Namespace) -> int:
    """Runs the measurement (launching horovodrun unless inside one); returns the exit status."""
    _check(args)
    if _inside_horovodrun():
        return _train(args)
    from hvd_largebatch.bench.data import MNIST1DSpec, load_mnist1d

    load_mnist1d(_spec(args, MNIST1DSpec), log=print)  # generate and cache once, before the ranks start
    horovodrun = Path(sys.executable).with_name("horovodrun")
    command = [
        str(horovodrun), "-np", str(args.workers), "-H", f"localhost:{args.workers}", "--gloo",
        sys.executable, "-m", "hvd_largebatch", *_argv(args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    status = subprocess.run(command, env=env).returncode
    if status == 0:
        print((Path(args.out) / "noise_scale.md").read_text().strip().splitlines()[-1])
    return status


def _argv(args: argparse.Namespace) -> list[str]:
    words = ["noise-scale"]
    for name in ("global_batch", "epochs", "optimizer", "lr", "interval", "ema_decay", "workers", "train_size", "seed", "out"):
        value = getattr(args, name)
        if value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    return words


def _spec(args: argparse.Namespace, spec_class: Any) -> Any:
    # The test split is not used here; keep it small so that a new --train-size generates quickly.
    return spec_class(train_size=args.train_size, test_size=TEST_SIZE)


def _train(args: argparse.Namespace) -> int:
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    from hvd_largebatch import schedules
    from hvd_largebatch.bench.data import MNIST1DSpec, ShardedBatches, load_mnist1d
    from hvd_largebatch.bench.recipes import BASE_BATCH, BASE_LRS
    from hvd_largebatch.torch_impl import DistributedOptimizer, NoiseScaleMonitor, broadcast_state, create_optimizer
    from hvd_largebatch.bench.torch_model import MNIST1DConvNet

    hvd.init()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank, size = hvd.rank(), hvd.size()
    if size != args.workers:
        raise ValueError(f"--workers={args.workers} but horovodrun started {size} processes")
    data = load_mnist1d(_spec(args, MNIST1DSpec))
    lr = args.lr if args.lr is not None else schedules.scale_lr(BASE_LRS[args.optimizer], BASE_BATCH, args.global_batch)
    torch.manual_seed(args.seed)
    model = MNIST1DConvNet()
    extra = {"momentum": 0.9} if args.optimizer != "lamb" else {}
    optimizer = DistributedOptimizer(create_optimizer(args.optimizer, model.named_parameters(), lr=lr, **extra))
    broadcast_state(model, optimizer, root_rank=0)
    local_batch = args.global_batch // size
    monitor = NoiseScaleMonitor(optimizer, batch_size=local_batch, interval=args.interval, ema_decay=args.ema_decay)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    shards = ShardedBatches(len(x_train), args.global_batch, rank, size, args.seed)
    rows: list[dict[str, Any]] = []
    step = 0
    for epoch in range(args.epochs):
        model.train()
        for xb, yb in shards.batches(x_train, y_train, epoch):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            if step % args.interval == 0:
                rows.append(dict(zip(COLUMNS, (step, epoch, float(loss), monitor.b_simple, monitor.g2, monitor.s,
                                               monitor.raw_g2, monitor.raw_s))))
            step += 1
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: step {step}, B_simple {monitor.b_simple:,.1f}", flush=True)
    if rank == 0:
        _write_outputs(Path(args.out), rows, monitor.advice(), args, lr)
    return 0


def _write_outputs(out: Path, rows: list[dict[str, Any]], advice: str, args: argparse.Namespace, lr: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "noise_scale.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    every = max(1, math.ceil(len(rows) / TABLE_ROWS))
    shown = rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])
    lines = [
        f"# Gradient noise scale of the bench model ({args.optimizer}, LR {lr:g}, global batch {args.global_batch}, "
        f"{args.workers} workers, measured every {args.interval} step(s), EMA decay {args.ema_decay})",
        "",
        "| step | epoch | train loss | B_simple | EMA(G2) | EMA(S) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in shown:
        lines.append(f"| {row['step']} | {row['epoch']} | {row['train_loss']:.4f} | {row['b_simple']:,.1f} | "
                     f"{row['g2']:.4g} | {row['s']:.4g} |")
    lines += ["", advice]
    (out / "noise_scale.md").write_text("\n".join(lines) + "\n")
    (out / "noise_scale.json").write_text(json.dumps({"settings": vars(args) | {"lr": lr}, "advice": advice}, default=str))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["b_simple"] for r in rows], label="B_simple = EMA(S) / EMA(G2)")
    ax.axhline(args.global_batch, color="grey", linestyle="--", label=f"global batch {args.global_batch}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("examples")
    ax.set_title("Gradient noise scale of the bench model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "noise_scale.png", dpi=120)
    plt.close(fig)
