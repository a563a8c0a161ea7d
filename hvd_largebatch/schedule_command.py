"""The ``hvd-largebatch schedule`` command: print, plot or export a learning-rate schedule.

It turns the terms a user thinks in (base LR at a base batch, global batch or
per-worker batch x workers, epochs, dataset size) into a core
:class:`~hvd_largebatch.schedules.Schedule` and shows the LR at the steps that
matter: start, the per-iteration warmup ramp, end of warmup, each decay
milestone, a few epoch boundaries and the end. Registered by
:mod:`hvd_largebatch.cli` through :func:`register`.

Defaults follow the run the user describes: the warmup is Goyal's 5 epochs,
or 5/90 of a run shorter than his 90 epochs
(:func:`~hvd_largebatch.schedules.recipes.goyal_warmup_epochs`); step-decay
milestones are his epochs 30, 60, 80 of 90 as fractions of ``--epochs``
(:func:`~hvd_largebatch.schedules.recipes.goyal_milestones`). A flag that the
chosen ``--decay``/``--warmup``/batch form does not read is refused, naming
what ignores it, rather than silently dropped.

Example (shell)::

    hvd-largebatch schedule --base-lr 0.1 --base-batch 256 --global-batch 8192 \\
        --epochs 90 --warmup-epochs 5 --decay step --dataset-size 1281167 --plot sched.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from hvd_largebatch import schedules
from hvd_largebatch.config import check_non_negative, check_positive
from hvd_largebatch.schedules.decay import DECAYS
from hvd_largebatch.schedules.recipes import goyal_milestones, goyal_warmup_epochs

__all__ = ["FLAG_NAMES", "register", "run", "build_schedule", "key_steps", "table_rows", "format_report", "write_plot"]

#: The library's argument names as this command's flags, for error messages (see ``cli.in_flag_terms``).
FLAG_NAMES = {
    "base_lr": "--base-lr",
    "base_batch": "--base-batch",
    "global_batch": "--global-batch",
    "per_worker_batch": "--per-worker-batch",
    "world_size": "--workers",
    "backward_passes_per_step": "--backward-passes-per-step",
    "scaling": "--scaling",
    "dataset_size": "--dataset-size",
    "steps_per_epoch": "--steps-per-epoch",
    "epochs": "--epochs",
    "warmup_epochs": "--warmup-epochs",
    "warmup_steps": "--warmup-epochs",  # the library's "warmup_steps=0" is "--warmup-epochs 0" here
    "warmup": "--warmup",
    "warmup_start": "--warmup-start",
    "decay": "--decay",
    "milestones": "--milestones",
    "milestone_unit": "--milestone-unit",
    "gamma": "--gamma",
    "power": "--power",
    "end_lr": "--end-lr",
}
#: Values of the decay flags when not given (each is refused with a decay that does not read it).
_DECAY_DEFAULTS = {"milestone_unit": "epoch", "gamma": 0.1, "power": 2.0, "end_lr": 0.0}
#: The decays that read each decay flag.
_DECAY_FLAG_USERS = {
    "milestones": tuple(kind for kind, piece in DECAYS.items() if piece.uses_milestones),
    "milestone_unit": tuple(kind for kind, piece in DECAYS.items() if piece.uses_milestones),
    "gamma": tuple(kind for kind, piece in DECAYS.items() if piece.uses_milestones),
    "power": ("poly",),
    "end_lr": tuple(kind for kind, piece in DECAYS.items() if piece.ends_at_end_lr),
}
_PLOT_POINTS = 20000  # schedules longer than this are sampled (key steps always included)


def _number_or_name(text: str) -> float | str:
    """``--warmup-start`` values: a number, or a symbolic start checked by the library."""
    try:
        return float(text)
    except ValueError:
        return text


def _milestone(text: str) -> int | float:
    """An integer when the text is one (step milestones must be integers), else a float."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid milestone {text!r}: expected a number") from None


def register(subparsers: Any) -> None:
    """Adds the ``schedule`` sub-command to ``subparsers`` (see :mod:`hvd_largebatch.cli`)."""
    parser = subparsers.add_parser(
        "schedule",
        help="print (and plot) a large-batch learning-rate schedule",
        description=(
            "Builds a learning-rate schedule from a base LR tuned at a base batch (linear scaling rule, "
            "gradual warmup and decay of Goyal et al. 2017 / You et al. 2017) and prints the LR at key "
            "steps and epoch boundaries."
        ),
    )
    lr = parser.add_argument_group("learning rate and batch")
    lr.add_argument(
        "--base-lr", type=float, required=True, help="LR tuned at --base-batch, e.g. Goyal's 0.1 (required)"
    )
    lr.add_argument("--base-batch", type=int, default=256, help="reference batch of --base-lr (default: 256)")
    batch = lr.add_mutually_exclusive_group(required=True)
    batch.add_argument(
        "--global-batch", type=int, help="examples per update over all workers (required, or --per-worker-batch)"
    )
    batch.add_argument(
        "--per-worker-batch",
        type=int,
        help="examples per worker per pass; needs --workers (required, or --global-batch)",
    )
    lr.add_argument(
        "--workers",
        type=int,
        help="Horovod world size; checks that the global batch divides evenly (default: not checked)",
    )
    lr.add_argument(
        "--backward-passes-per-step",
        type=int,
        default=None,
        help="local gradient accumulation per update; needs --workers (default: 1)",
    )
    lr.add_argument(
        "--scaling", choices=schedules.SCALING_RULES, default="linear", help="LR scaling rule (default: linear)"
    )

    length = parser.add_argument_group("training length")
    length.add_argument("--epochs", type=float, required=True, help="training epochs (required)")
    per_epoch = length.add_mutually_exclusive_group(required=True)
    per_epoch.add_argument(
        "--dataset-size",
        type=int,
        help="training examples, steps per epoch = size / batch (required, or --steps-per-epoch)",
    )
    per_epoch.add_argument(
        "--steps-per-epoch", type=int, help="optimizer updates per epoch (required, or --dataset-size)"
    )
    length.add_argument(
        "--keep-remainder",
        action="store_true",
        help="with --dataset-size: count the last partial batch of an epoch as a step (default: dropped)",
    )

    warmup = parser.add_argument_group("warmup")
    warmup.add_argument(
        "--warmup", choices=schedules.WARMUP_KINDS, default="gradual", help="warmup kind (default: gradual)"
    )
    warmup.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help="warmup length in epochs (default: Goyal's 5, or 5/90 of a run shorter than 90 epochs)",
    )
    warmup.add_argument(
        "--warmup-start",
        type=_number_or_name,
        default=None,
        help="warmup start LR: a number, 'base_lr' (Goyal) or 'peak/world_size' (Horovod; needs --workers) "
        "(default: base_lr)",
    )

    decay = parser.add_argument_group("decay")
    decay.add_argument(
        "--decay", choices=schedules.DECAY_KINDS, default="step", help="decay after warmup (default: step)"
    )
    decay.add_argument(
        "--milestones",
        type=_milestone,
        nargs="+",
        default=None,
        help="step decay milestones (default: Goyal's epochs 30 60 80 of 90 scaled to --epochs, i.e. "
        "1/3, 2/3 and 8/9 of the run)",
    )
    decay.add_argument(
        "--milestone-unit",
        choices=schedules.MILESTONE_UNITS,
        default=None,
        help="unit of --milestones (default: epoch)",
    )
    decay.add_argument("--gamma", type=float, default=None, help="step decay factor (default: 0.1)")
    decay.add_argument("--power", type=float, default=None, help="poly decay power (default: 2)")
    decay.add_argument("--end-lr", type=float, default=None, help="final LR of poly/cosine/linear (default: 0)")

    output = parser.add_argument_group("output")
    output.add_argument(
        "--plot", metavar="FILE.png", help="write a plot of LR against epoch (matplotlib) (default: no plot)"
    )
    output.add_argument(
        "--json", action="store_true", help="print the schedule config and the table as JSON (default: text)"
    )
    parser.set_defaults(handler=run, flag_names=FLAG_NAMES)


def _flag(name: str) -> str:
    return FLAG_NAMES[name]


def _refuse_unused(args: argparse.Namespace) -> None:
    """Refuses every given flag that the chosen decay, warmup or batch form does not read.

    Raises:
        ValueError: ``--X is only used by ...; ... ignores it``.
    """
    for name, users in _DECAY_FLAG_USERS.items():
        if getattr(args, name) is not None and args.decay not in users:
            raise ValueError(
                f"{_flag(name)} is only used by --decay {', '.join(users)}; --decay {args.decay} ignores it"
            )
    if args.warmup == "none":
        for name in ("warmup_epochs", "warmup_start"):
            if getattr(args, name) is not None:
                users = ", ".join(kind for kind in schedules.WARMUP_KINDS if kind != "none")
                raise ValueError(f"{_flag(name)} is only used by --warmup {users}; --warmup none ignores it")
    if args.keep_remainder and args.dataset_size is None:
        raise ValueError("--keep-remainder is only used with --dataset-size; --steps-per-epoch ignores it")
    if args.backward_passes_per_step is not None and args.workers is None:
        raise ValueError(
            "--backward-passes-per-step is only used with --workers (per-worker batch = global batch / "
            "(workers x passes)); without --workers it is ignored"
        )


def build_schedule(args: argparse.Namespace) -> tuple[schedules.Schedule, dict[str, Any]]:
    """The schedule described by parsed arguments, and a summary of how it was derived.

    Raises:
        ValueError: naming the option at fault (the library's argument names
            become flags in :func:`hvd_largebatch.cli.main` through :data:`FLAG_NAMES`).
    """
    _refuse_unused(args)
    passes = 1 if args.backward_passes_per_step is None else args.backward_passes_per_step
    decay_args = {name: (default if getattr(args, name) is None else getattr(args, name))
                  for name, default in _DECAY_DEFAULTS.items()}
    if args.per_worker_batch is not None:
        if args.workers is None:
            raise ValueError("--per-worker-batch needs --workers (global batch = per-worker batch x workers)")
        global_batch = schedules.global_batch_size(args.per_worker_batch, args.workers, passes)
    else:
        global_batch = args.global_batch
    per_worker = None
    if args.workers is not None:
        per_worker = schedules.per_worker_batch_size(global_batch, args.workers, passes)

    if args.steps_per_epoch is not None:
        steps_per_epoch = args.steps_per_epoch
    else:
        size = args.dataset_size
        whole = isinstance(size, int) and isinstance(global_batch, int)
        if not args.keep_remainder and whole and 0 < size < global_batch:
            raise ValueError(
                f"--dataset-size {size} is smaller than the global batch {global_batch}: an epoch would have no "
                "step; allowed: --dataset-size >= global batch, or --keep-remainder"
            )
        steps_per_epoch = schedules.steps_per_epoch(size, global_batch, not args.keep_remainder)

    epochs = check_positive("epochs", args.epochs)
    defaults: dict[str, str] = {}
    if args.warmup == "none":
        warmup_epochs = 0.0
    elif args.warmup_epochs is None:
        warmup_epochs = goyal_warmup_epochs(epochs)
        defaults["warmup_epochs"] = "Goyal's 5, or 5/90 of a shorter run"
    else:
        warmup_epochs = check_non_negative("warmup_epochs", args.warmup_epochs)
    if warmup_epochs > epochs:
        raise ValueError(
            f"--warmup-epochs {warmup_epochs:g} is longer than training (--epochs {epochs:g}); "
            "allowed: 0 <= warmup epochs <= epochs"
        )
    total_steps = schedules.epochs_to_steps(epochs, steps_per_epoch, "epochs")
    if total_steps < 1:
        raise ValueError(f"--epochs {epochs:g} gives no optimizer step at {steps_per_epoch} steps per epoch")
    warmup_steps = schedules.epochs_to_steps(warmup_epochs, steps_per_epoch, "warmup_epochs")

    milestones: tuple = ()
    if args.decay == "step":
        if args.milestones is not None:
            milestones = tuple(args.milestones)
        elif decay_args["milestone_unit"] == "step":
            raise ValueError("--milestones is required with --milestone-unit step")
        else:
            milestones = goyal_milestones(epochs, after=warmup_steps / steps_per_epoch)
            if not milestones:
                raise ValueError(
                    f"--milestones: the default ones (1/3, 2/3 and 8/9 of --epochs {epochs:g}) all lie within the "
                    f"warmup (--warmup-epochs {warmup_epochs:g}); pass --milestones"
                )
            defaults["milestones"] = "Goyal's epochs 30, 60, 80 of 90 scaled to --epochs"

    schedule = schedules.make_schedule(
        args.base_lr,
        total_steps,
        base_batch=args.base_batch,
        global_batch=global_batch,
        scaling=args.scaling,
        warmup=args.warmup,
        warmup_steps=warmup_steps,
        warmup_start=None if args.warmup == "none" else args.warmup_start,
        world_size=args.workers,
        decay=args.decay,
        milestones=milestones,
        steps_per_epoch=steps_per_epoch,
        **decay_args,
    )
    summary = {
        "base_lr": float(args.base_lr),
        "base_batch": args.base_batch,
        "global_batch": global_batch,
        "workers": args.workers,
        "per_worker_batch": per_worker,
        "backward_passes_per_step": passes,
        "scaling": args.scaling,
        "peak": schedule.peak,
        "dataset_size": args.dataset_size,
        "keep_remainder": bool(args.keep_remainder),
        "steps_per_epoch": steps_per_epoch,
        "epochs": epochs,
        "warmup_epochs": warmup_epochs,
        "total_steps": schedule.total_steps,
        "warmup_steps": schedule.warmup_steps,
        "final_lr": schedule(schedule.total_steps),
        "defaults": defaults,
    }
    return schedule, summary


def _epoch_stride(epochs: float) -> int:
    """A round stride (1, 2, 5, 10, 20, ...) giving at most about ten epoch rows."""
    target = max(epochs / 10.0, 1.0)
    magnitude = 10 ** math.floor(math.log10(target))
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= target:
            return int(factor * magnitude)
    return int(10 * magnitude)  # pragma: no cover - the loop always returns


def key_steps(schedule: schedules.Schedule) -> list[tuple[int, str]]:
    """``(step, event)`` pairs worth printing, sorted by step, one per step.

    Start, the first and last warmup steps, end of warmup, each milestone,
    epoch boundaries at a round stride, the last training step and ``T``
    (after which the LR stays constant).
    """
    events: dict[int, list[str]] = {}

    def add(step: int, label: str = "") -> None:
        labels = events.setdefault(step, [])
        if label:
            labels.append(label)

    total, warmup = schedule.total_steps, schedule.warmup_steps
    add(0, "start")
    if warmup > 1:
        add(1, "warmup ramp (per iteration)")
        add(warmup - 1, "last warmup step")
    if warmup > 0:
        add(warmup, "end of warmup: peak")
    for index, step in enumerate(schedule.milestone_steps, start=1):
        add(step, f"milestone {index}: x{schedule.gamma:g}")
    spe = schedule.steps_per_epoch
    if spe is not None:
        stride = _epoch_stride(total / spe)
        epoch = stride
        while epoch * spe < total:
            add(epoch * spe)
            epoch += stride
    if total > 1:
        add(total - 1, "last training step")
    add(total, "end (LR stays here)")
    return [(step, "; ".join(labels)) for step, labels in sorted(events.items())]


def table_rows(schedule: schedules.Schedule) -> list[dict[str, Any]]:
    """The printed table as JSON-able rows: ``step``, ``epoch`` (or None), ``lr``, ``event``."""
    spe = schedule.steps_per_epoch
    return [
        {"step": step, "epoch": None if spe is None else step / spe, "lr": schedule(step), "event": event}
        for step, event in key_steps(schedule)
    ]


def format_report(schedule: schedules.Schedule, summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The compact text report: three summary lines and the table."""
    batch = f"global batch {summary['global_batch']}"
    if summary["workers"] is not None:
        batch += f" = {summary['per_worker_batch']} per worker x {summary['workers']} workers"
        if summary["backward_passes_per_step"] > 1:
            batch += f" x {summary['backward_passes_per_step']} backward passes"
    scaling = (
        f"base LR {summary['base_lr']:g} at batch {summary['base_batch']}, "
        f"{summary['scaling']} scaling -> peak LR {summary['peak']:.6g}"
    )
    if summary["dataset_size"] is not None:
        remainder = "last partial batch kept" if summary["keep_remainder"] else "remainder dropped"
        per_epoch = f"{summary['steps_per_epoch']} steps per epoch ({summary['dataset_size']} examples, {remainder})"
    else:
        per_epoch = f"{summary['steps_per_epoch']} steps per epoch"
    lines = [
        f"{batch}; {scaling}",
        f"{per_epoch}; total steps {summary['total_steps']} ({summary['epochs']:g} epochs); "
        f"warmup steps {summary['warmup_steps']} ({summary['warmup_epochs']:g} epochs)",
        schedule.describe(),
    ]
    if summary.get("defaults"):
        lines.append("defaults used: " + "; ".join(f"{_flag(name)}: {why}" for name, why in summary["defaults"].items()))
    lines += [
        "",
        f"{'step':>9}  {'epoch':>7}  {'lr':>12}  event",
    ]
    for row in rows:
        epoch = "" if row["epoch"] is None else f"{row['epoch']:.2f}"
        lines.append(f"{row['step']:>9}  {epoch:>7}  {row['lr']:>12.6g}  {row['event']}".rstrip())
    return "\n".join(lines)


def write_plot(schedule: schedules.Schedule, path: str) -> None:
    """Writes LR against epoch (or step) to ``path``; matplotlib is imported here, Agg canvas.

    Raises:
        ValueError: when the file cannot be written or the format is unknown.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"--plot directory does not exist: {directory}")
    total = schedule.total_steps
    if total <= _PLOT_POINTS:
        steps = list(range(total + 1))
    else:
        stride = total / _PLOT_POINTS
        sampled = {round(i * stride) for i in range(_PLOT_POINTS + 1)}
        # Both sides of every jump, so step decays stay vertical.
        sampled.update(s for step, _ in key_steps(schedule) for s in (step - 1, step) if 0 <= s <= total)
        steps = sorted(sampled)
    spe = schedule.steps_per_epoch
    xs = [s / spe for s in steps] if spe else steps
    lrs = [schedule(s) for s in steps]
    figure = Figure(figsize=(10.0, 3.8), dpi=110)
    FigureCanvasAgg(figure)
    linear_axes, log_axes = figure.subplots(1, 2)
    for axes, scale in ((linear_axes, "linear"), (log_axes, "log")):
        if scale == "log":
            # A log axis cannot show LR 0 (poly/cosine to end_lr=0): those points are left out.
            kept = [(x, lr) for x, lr in zip(xs, lrs) if lr > 0]
            axes.plot([x for x, _ in kept], [lr for _, lr in kept], color="tab:blue", linewidth=1.6)
            if kept:
                axes.set_yscale("log")
        else:
            axes.plot(xs, lrs, color="tab:blue", linewidth=1.6)
        if schedule.warmup_steps:
            end = schedule.warmup_steps / spe if spe else schedule.warmup_steps
            axes.axvline(end, color="gray", linestyle=":", linewidth=1, label="end of warmup")
            axes.legend(loc="upper right")
        axes.set_xlabel("epoch" if spe else "step")
        axes.set_ylabel(f"learning rate ({scale} scale)")
        axes.grid(alpha=0.3)
    figure.suptitle(f"peak LR {schedule.peak:.4g}: {schedule.warmup} warmup, {schedule.decay} decay", fontsize=10)
    figure.tight_layout()
    try:
        figure.savefig(path)
    except OSError as err:
        raise ValueError(f"--plot cannot write {path}: {err.strerror or err}") from None
    except ValueError as err:  # matplotlib: a file extension it has no writer for
        raise ValueError(f"--plot cannot write {path}: {err}") from None


def run(args: argparse.Namespace) -> int:
    """Handler of ``hvd-largebatch schedule``; ValueErrors become one line and exit 2 in the CLI."""
    schedule, summary = build_schedule(args)
    rows = table_rows(schedule)
    if args.plot:
        write_plot(schedule, args.plot)
    if args.json:
        print(json.dumps({"schedule": schedule.to_config(), "summary": summary, "table": rows, "plot": args.plot}))
    else:
        print(format_report(schedule, summary, rows))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0
