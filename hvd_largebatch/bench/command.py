"""The ``hvd-largebatch bench`` command: the batch-size sweep on MNIST-1D under Horovod.

Registered by :mod:`hvd_largebatch.cli` through :func:`register`; the work is
done by :mod:`hvd_largebatch.bench.plan` and :mod:`hvd_largebatch.bench.launch`.

Example (shell)::

    hvd-largebatch bench --framework torch --methods sgd,goyal,lars,clars,lamb,conadv \\
        --batch-sizes 128,512,2048,8192 --epochs 10 --workers 2 --out results/

It launches ``horovodrun -np 2 -H localhost:2 --gloo`` itself; started under
``horovodrun`` instead (``horovodrun -np 2 -H localhost:2 hvd-largebatch bench ...``)
it runs in that launch. Rerunning the same command resumes an interrupted sweep.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from hvd_largebatch.bench import launch, plan
from hvd_largebatch.bench.data import DEFAULT_SEED, DEFAULT_TEST_SIZE, DEFAULT_TRAIN_SIZE, MNIST1DSpec
from hvd_largebatch.bench.recipes import BASE_BATCH, BASE_LRS, METHOD_NAMES, METHODS
from hvd_largebatch.bench.worker import print_line

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Adds the ``bench`` sub-command to ``subparsers`` (see :mod:`hvd_largebatch.cli`)."""
    methods_help = "; ".join(f"{name}: {METHODS[name].summary} (base LR {BASE_LRS[name]:g})" for name in METHOD_NAMES)
    parser = subparsers.add_parser(
        "bench",
        help="run the batch-size sweep (methods x global batch sizes) on MNIST-1D under horovodrun",
        description=(
            "Trains the same 1-D CNN on MNIST-1D for the same number of epochs with each method at each "
            "global batch size, under Horovod, and writes results.json, results.csv, table.md and "
            "accuracy_vs_batch.png to --out. Launches horovodrun itself, or runs inside one when started by "
            "horovodrun. Rerun the same command to resume an interrupted sweep. Methods: " + methods_help
        ),
    )
    parser.add_argument("--framework", choices=plan.FRAMEWORKS, default="torch", help="default: torch")
    parser.add_argument(
        "--methods", default=",".join(METHOD_NAMES), help=f"comma-separated, default: {','.join(METHOD_NAMES)}"
    )
    parser.add_argument(
        "--batch-sizes",
        default=",".join(map(str, plan.DEFAULT_BATCH_SIZES)),
        help="global batch sizes, comma-separated, default: %(default)s",
    )
    parser.add_argument("--epochs", type=int, default=plan.DEFAULT_EPOCHS, help="epochs per cell, default: %(default)s")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"Horovod processes on localhost, default: {plan.DEFAULT_WORKERS} (inside horovodrun: its size)",
    )
    parser.add_argument("--out", default="results", help="output directory, default: %(default)s")
    parser.add_argument("--backend", choices=launch.BACKENDS, default="gloo", help="horovodrun controller, default: gloo")
    parser.add_argument("--seed", type=int, default=0, help="model-initialisation and data-order seed, default: 0")
    parser.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE, help="MNIST-1D training examples")
    parser.add_argument("--test-size", type=int, default=DEFAULT_TEST_SIZE, help="MNIST-1D test examples")
    parser.add_argument("--data-seed", type=int, default=DEFAULT_SEED, help="seed of the MNIST-1D generator")
    parser.add_argument(
        "--base-batch", type=int, default=BASE_BATCH, help="the batch the base LRs refer to, default: %(default)s"
    )
    parser.add_argument(
        "--base-lr",
        metavar="METHOD=LR[,...]",
        default=None,
        help="override base LRs (at --base-batch), e.g. lars=1.0,sgd=0.05",
    )
    parser.set_defaults(handler=run)


def _settings(args: argparse.Namespace, workers: int) -> plan.SweepSettings:
    return plan.SweepSettings(
        epochs=args.epochs,
        workers=workers,
        seed=args.seed,
        data=MNIST1DSpec(train_size=args.train_size, test_size=args.test_size, seed=args.data_seed),
        base_batch=args.base_batch,
        base_lrs=plan.parse_base_lrs(args.base_lr),
    )


def _command_text(args: argparse.Namespace) -> str:
    """The command in canonical form (every sweep option written out), for the reports."""
    words = [
        "hvd-largebatch", "bench", "--framework", args.framework, "--methods", args.methods,
        "--batch-sizes", args.batch_sizes, "--epochs", str(args.epochs),
    ]
    if args.workers is not None:
        words += ["--workers", str(args.workers)]
    words += ["--out", args.out]
    defaults = {"seed": 0, "train_size": DEFAULT_TRAIN_SIZE, "test_size": DEFAULT_TEST_SIZE,
                "data_seed": DEFAULT_SEED, "base_batch": BASE_BATCH, "base_lr": None, "backend": "gloo"}
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default:
            words += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    """Runs the sweep; returns 0, 1 when a cell failed, 2 for bad arguments (via ValueError)."""
    methods = plan.parse_name_list(args.methods, "--methods", METHOD_NAMES)
    batch_sizes = plan.parse_int_list(args.batch_sizes, "--batch-sizes")
    command_text = _command_text(args)

    def build(workers: int):
        if args.workers is not None and args.workers != workers:
            raise ValueError(f"--workers={args.workers} but horovodrun started {workers} processes")
        settings = _settings(args, workers)
        return plan.plan_sweep(args.framework, methods, batch_sizes, settings), settings

    echo = print_line
    if launch.inside_horovodrun():
        return launch.run_sweep_inside_horovodrun(args.framework, build, args.out, command_text=command_text, echo=echo)
    plans, settings = build(args.workers if args.workers is not None else plan.DEFAULT_WORKERS)
    return launch.launch_sweep(
        args.framework, plans, settings, args.out, backend=args.backend, command_text=command_text, echo=echo
    )
