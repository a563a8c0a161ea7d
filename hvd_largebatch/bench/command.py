"""The ``hvd-largebatch bench`` command: the batch-size study on MNIST-1D under Horovod.

Registered by :mod:`hvd_largebatch.cli` through :func:`register`; the work is
done by :mod:`hvd_largebatch.bench.plan` and :mod:`hvd_largebatch.bench.launch`.

Example (shell)::

    hvd-largebatch bench --framework torch --methods sgd,goyal,lars,lamb \\
        --batch-sizes 64,256,1024,4096 --targets 0.95 --trials 3 --seeds 2 --out results/

It launches ``horovodrun -np 2 -H localhost:2 --gloo`` itself; started under
``horovodrun`` instead (``horovodrun -np 2 -H localhost:2 hvd-largebatch bench ...``)
it runs in that launch. Rerunning the same command resumes an interrupted study.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from hvd_largebatch.bench import launch, plan, report
from hvd_largebatch.bench.data import DEFAULT_SEED, DEFAULT_TEST_SIZE, DEFAULT_TRAIN_SIZE, MNIST1DSpec
from hvd_largebatch.bench.recipes import BASE_BATCH, BASE_LRS, METHOD_NAMES, METHODS
from hvd_largebatch.bench.results import ResultsStore
from hvd_largebatch.bench.study import DEFAULT_HORIZON, DEFAULT_TARGETS, DEFAULT_VALIDATION_SIZE, StudySettings
from hvd_largebatch.bench.tuning import SearchSpace
from hvd_largebatch.bench.worker import print_line

__all__ = ["FLAG_NAMES", "register", "run"]

#: The study's argument names as this command's flags, for error messages (see ``cli.in_flag_terms``).
FLAG_NAMES = {
    "framework": "--framework",
    "methods": "--methods",
    "batch_sizes": "--batch-sizes",
    "targets": "--targets",
    "trials": "--trials",
    "seeds": "--seeds",
    "epochs": "--epochs",
    "workers": "--workers",
    "train_size": "--train-size",
    "validation_size": "--validation-size",
    "test_size": "--test-size",
    "base_batch": "--base-batch",
    "horizon": "--horizon",
}


def register(subparsers: Any) -> None:
    """Adds the ``bench`` sub-command to ``subparsers`` (see :mod:`hvd_largebatch.cli`)."""
    methods_help = "; ".join(f"{name}: {METHODS[name].summary} (base LR {BASE_LRS[name]:g})" for name in METHOD_NAMES)
    space = SearchSpace()
    parser = subparsers.add_parser(
        "bench",
        help="run the batch-size study (steps to a target accuracy against batch size) on MNIST-1D under horovodrun",
        description=(
            "Measures, for each method and global batch size, the optimizer steps the 1-D CNN needs to reach a "
            "target accuracy on a held-out validation split of MNIST-1D, with the peak LR, decay horizon and "
            "warmup tuned per (method, batch) on the same number of trials for every method, the best setting "
            "repeated over seeds, the fit S(B) = S_min (1 + B_crit/B) per method, the gradient noise scale "
            "B_simple and the accuracy after a fixed number of epochs. Writes results.json, results.csv, "
            "summary.json, table.md, steps_vs_batch.png and noise_scale.png to --out. Launches horovodrun itself, "
            "or runs inside one when started by horovodrun. Rerun the same command to resume. Methods: "
            + methods_help
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
    parser.add_argument(
        "--targets", default=",".join(f"{t:g}" for t in DEFAULT_TARGETS),
        help="validation accuracies to reach, ascending; tuning optimises the first, default: %(default)s",
    )
    parser.add_argument("--trials", type=int, default=space.trials, help="tuning trials per (method, batch), "
                        "the same for every method, default: %(default)s")
    parser.add_argument("--seeds", type=int, default=2, help="repeats of each best setting with new seeds "
                        "(the table's median is over the best trial and these), default: %(default)s")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the fixed-epoch view "
                        "(0: none), default: %(default)s")
    parser.add_argument("--lr-range", default=f"{space.lr_low:g},{space.lr_high:g}",
                        help="peak-LR search range as multiples of the scaled base LR, default: %(default)s")
    parser.add_argument("--horizon", default=",".join(f"{v:g}" for v in DEFAULT_HORIZON), metavar="S0,B0",
                        help="centre of the decay-horizon search at batch B: S0*(1+B0/B) steps, default: %(default)s")
    parser.add_argument("--horizon-range", default=f"{space.horizon_low:g},{space.horizon_high:g}",
                        help="horizon search range as multiples of that centre, default: %(default)s")
    parser.add_argument("--warmup-range", default=f"{space.warmup_low:g},{space.warmup_high:g}",
                        help="warmup search range, fractions of the horizon, default: %(default)s")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"Horovod processes on localhost, default: {plan.DEFAULT_WORKERS} (inside horovodrun: its size)",
    )
    parser.add_argument("--out", default="results", help="output directory, default: %(default)s")
    parser.add_argument("--backend", choices=launch.BACKENDS, default="gloo", help="horovodrun controller, default: gloo")
    parser.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE,
                        help="MNIST-1D examples generated for training and validation, default: %(default)s")
    parser.add_argument("--validation-size", type=int, default=DEFAULT_VALIDATION_SIZE,
                        help="of those, held out for the targets, default: %(default)s")
    parser.add_argument("--test-size", type=int, default=DEFAULT_TEST_SIZE, help="MNIST-1D test examples, default: %(default)s")
    parser.add_argument("--data-seed", type=int, default=DEFAULT_SEED, help="seed of the MNIST-1D generator, default: %(default)s")
    parser.add_argument(
        "--base-batch", type=int, default=BASE_BATCH, help="the batch the base LRs refer to, default: %(default)s"
    )
    parser.add_argument(
        "--base-lr",
        metavar="METHOD=LR[,...]",
        default=None,
        help="override base LRs (at --base-batch), e.g. lars=1.0,sgd=0.05, default: the base LRs listed above",
    )
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the reports of --out from its results.json, default: off (run the study)")
    parser.add_argument("--merge", action="append", default=[], metavar="DIR",
                        help="with --report-only: first add the finished runs of another output directory of "
                             "the same study settings (e.g. other methods run at the same time) to --out; repeatable, default: none")
    parser.set_defaults(handler=run, flag_names=FLAG_NAMES)


def _settings(args: argparse.Namespace, workers: int) -> StudySettings:
    lr = plan.parse_float_list(args.lr_range, "--lr-range", 2)
    horizon = plan.parse_float_list(args.horizon_range, "--horizon-range", 2)
    warmup = plan.parse_float_list(args.warmup_range, "--warmup-range", 2)
    return StudySettings(
        targets=tuple(plan.parse_float_list(args.targets, "--targets")),
        search=SearchSpace(trials=args.trials, lr_low=lr[0], lr_high=lr[1], horizon_low=horizon[0],
                           horizon_high=horizon[1], warmup_low=warmup[0], warmup_high=warmup[1]),
        seeds=args.seeds,
        epochs=args.epochs,
        workers=workers,
        data=MNIST1DSpec(train_size=args.train_size, test_size=args.test_size, seed=args.data_seed),
        validation_size=args.validation_size,
        base_batch=args.base_batch,
        base_lrs=plan.parse_base_lrs(args.base_lr),
        horizon=tuple(plan.parse_float_list(args.horizon, "--horizon", 2)),
    )


_OPTIONS = ("targets", "trials", "seeds", "epochs", "lr_range", "horizon", "horizon_range", "warmup_range")
_DATA_OPTIONS = ("train_size", "validation_size", "test_size", "data_seed", "base_batch", "base_lr", "backend")


def _command_text(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> str:
    """The command in canonical form (every study option written out), for the reports."""
    words = ["hvd-largebatch", "bench", "--framework", args.framework, "--methods", args.methods,
             "--batch-sizes", args.batch_sizes]
    for name in _OPTIONS:
        words += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.workers is not None:
        words += ["--workers", str(args.workers)]
    words += ["--out", args.out]
    for name in _DATA_OPTIONS:
        value = getattr(args, name)
        if value != parser_defaults.get(name):
            words += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join(words)


_DEFAULTS = {"train_size": DEFAULT_TRAIN_SIZE, "validation_size": DEFAULT_VALIDATION_SIZE,
             "test_size": DEFAULT_TEST_SIZE, "data_seed": DEFAULT_SEED, "base_batch": BASE_BATCH,
             "base_lr": None, "backend": "gloo"}


def report_only(out: str, merge: list[str]) -> int:
    """``--report-only``: merges the other directories' runs into ``out`` and rewrites its reports.

    Raises:
        ValueError: naming ``--out`` when it holds no study, or ``--merge`` (other settings).
    """
    store = ResultsStore(out)
    if store.settings is None:
        raise ValueError(f"--out {out} holds no study results.json to report")
    for directory in merge:
        added = store.merge(ResultsStore(directory))
        print_line(f"merged {added} run(s) of {directory} into {store.path}")
    store.save()
    print_line(report.write_reports(store).rstrip())
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs the study; returns 0, 1 when a run failed, 2 for bad arguments (via ValueError)."""
    if args.merge and not args.report_only:
        raise ValueError("--merge works with --report-only only (it runs nothing)")
    if args.report_only:
        return report_only(args.out, args.merge)
    methods = plan.parse_name_list(args.methods, "--methods", METHOD_NAMES)
    batch_sizes = plan.parse_int_list(args.batch_sizes, "--batch-sizes")
    plan.check_study_lists(args.framework, methods, batch_sizes)
    command_text = _command_text(args, _DEFAULTS)

    def build(workers: int):
        if args.workers is not None and args.workers != workers:
            raise ValueError(f"--workers={args.workers} but horovodrun started {workers} processes")
        return methods, sorted(batch_sizes), _settings(args, workers)

    echo = print_line
    if launch.inside_horovodrun():
        return launch.run_study_inside_horovodrun(args.framework, build, args.out, command_text=command_text, echo=echo)
    methods, batch_sizes, settings = build(args.workers if args.workers is not None else plan.DEFAULT_WORKERS)
    return launch.launch_study(
        args.framework, methods, batch_sizes, settings, args.out, backend=args.backend, command_text=command_text,
        echo=echo,
    )
