"""The worker side of ``hvd-largebatch bench``: runs the study's remaining runs on every rank.

``horovodrun`` starts ``python -m hvd_largebatch.bench.worker DIR/_run/job.json``
on each rank (or ``hvd-largebatch bench`` itself when the user launched it
under ``horovodrun``). Every rank loads the same cached MNIST-1D and runs the
runs rank 0 chooses (:func:`hvd_largebatch.bench.study.next_run`) through a framework *cell runner*
(``hvd_largebatch.bench.torch_runner`` or ``hvd_largebatch.bench.keras_runner``),
which trains with the package's optimizers, schedules and Horovod glue.

Rank 0 alone prints progress and writes ``results.json`` after each run; the
other ranks print nothing. When a cell raises on any rank, that rank writes
a failure marker naming the cell and exits with status 1; Horovod then shuts
the other ranks down and the launcher reports the cell (see
:class:`hvd_largebatch.bench.results.FailureMarkers`).

This module is framework-free; the runner module is imported by name.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from hvd_largebatch.bench.data import MNIST1D, load_mnist1d
from hvd_largebatch.bench.recipes import CellPlan
from hvd_largebatch.bench.results import FailureMarkers, ResultsStore
from hvd_largebatch.bench.run_monitor import summary_line
from hvd_largebatch.bench.study import StudySettings, next_run, runs_per_cell

__all__ = [
    "RUNNER_MODULES",
    "CellRunner",
    "WorkerJob",
    "CellFailed",
    "load_runner",
    "run_job",
    "format_duration",
    "print_line",
    "main",
]

#: The framework cell runners, imported by name so this module stays framework-free.
RUNNER_MODULES = {
    "torch": "hvd_largebatch.bench.torch_runner",
    "keras": "hvd_largebatch.bench.keras_runner",
}

EpochCallback = Callable[[Mapping[str, Any]], None]


class CellRunner(Protocol):
    """What a framework's sweep runner provides (one instance per process, after ``hvd.init()``)."""

    rank: int
    size: int

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (Horovod's ``broadcast_object``)."""

    def run_cell(self, plan: CellPlan, data: MNIST1D, on_epoch: EpochCallback | None) -> dict[str, Any]:
        """Trains one cell; returns its result (see :func:`run_job`); calls ``on_epoch`` after each epoch."""


class CellFailed(RuntimeError):
    """A cell raised on this rank; the failure marker is written."""


@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """What the workers of one launch run: a whole study (rank 0 picks each next run).

    Attributes:
        framework: ``"torch"`` or ``"keras"``.
        out_dir: the study's output directory.
        settings: the study settings (``StudySettings.to_config()``).
        methods: the methods, in the order they are run.
        batch_sizes: the global batch sizes.
    """

    framework: str
    out_dir: str
    settings: dict[str, Any]
    methods: tuple[str, ...]
    batch_sizes: tuple[int, ...]

    def to_config(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "out_dir": self.out_dir,
            "settings": self.settings,
            "methods": list(self.methods),
            "batch_sizes": list(self.batch_sizes),
        }

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> WorkerJob:
        values = dict(values)
        values["methods"] = tuple(values["methods"])
        values["batch_sizes"] = tuple(values["batch_sizes"])
        return cls(**values)


def load_runner(framework: str) -> CellRunner:
    """Imports the framework's runner module and returns its ``HorovodCellRunner()`` (calls ``hvd.init()``).

    Raises:
        ValueError: naming ``framework`` and the allowed values.
    """
    if framework not in RUNNER_MODULES:
        raise ValueError(f"framework must be one of {', '.join(map(repr, RUNNER_MODULES))}; got {framework!r}")
    return importlib.import_module(RUNNER_MODULES[framework]).HorovodCellRunner()


def format_duration(seconds: float) -> str:
    """``42.0 s``, ``3m05s`` or ``1h02m``."""
    if seconds < 100:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _run_header(plan: CellPlan, index: int, total: int) -> str:
    width = len(str(total))
    study = plan.study or {}
    what = {"tune": f"trial {study.get('trial')}", "seed": f"best trial {study.get('trial')}, seed {plan.seed}",
            "epochs": f"fixed {plan.epochs} epochs"}.get(study.get("phase"), "")
    warmup = f", warmup {plan.schedule.warmup_steps}" if plan.schedule.warmup_steps else ""
    return (
        f"[{index:>{width}}/{total}] {plan.framework} {plan.method:<8} batch {plan.global_batch:>5} {what}: "
        f"peak LR {plan.schedule.peak:.4g} (x{plan.lr_multiplier:.3g}), horizon {plan.total_steps} steps{warmup}"
    )


def _next_message(job: WorkerJob, settings: StudySettings, store: ResultsStore) -> dict[str, Any] | None:
    plan = next_run(job.framework, job.methods, job.batch_sizes, settings, store.records)
    return None if plan is None else {"plan": plan.to_config()}


def run_job(job: WorkerJob, runner: CellRunner, *, echo: Callable[[str], None] = print) -> None:
    """Runs the study's remaining runs on this rank; rank 0 chooses each run, prints and stores its result.

    Rank 0 asks :func:`hvd_largebatch.bench.study.next_run` for the next run
    and broadcasts it, so every rank runs the same plan and all stop together
    (an error on rank 0 while planning is broadcast too, so no rank waits).

    Raises:
        CellFailed: after writing this rank's failure marker, when a run raises.
    """
    rank = runner.rank
    markers = FailureMarkers(job.out_dir)
    store = ResultsStore(job.out_dir) if rank == 0 else None
    settings = StudySettings.from_config(job.settings)
    data = load_mnist1d(settings.data)
    total = len(job.methods) * len(job.batch_sizes) * runs_per_cell(settings)
    started = time.perf_counter()
    while True:
        message: dict[str, Any] | None = None
        if rank == 0:
            try:
                message = _next_message(job, settings, store)
            except Exception as error:  # noqa: BLE001 - told to every rank, then raised here
                message = {"error": f"{type(error).__name__}: {error}"}
                runner.broadcast_object(message)
                markers.mark_failed(rank, None, error, traceback.format_exc())
                raise CellFailed(f"planning the next run failed on rank 0: {error}") from error
        message = runner.broadcast_object(message)
        if message is None:
            return
        if "error" in message:
            raise CellFailed(f"rank 0 could not plan the next run: {message['error']}")
        plan = CellPlan.from_config(message["plan"])
        index = (len(store.records) + 1) if store is not None else 0
        if rank == 0:
            markers.mark_running(plan, index, total)
            echo(_run_header(plan, index, total))
        try:
            result = runner.run_cell(plan, data, None)
        except Exception as error:  # noqa: BLE001 - any failure stops the study, naming the run
            markers.mark_failed(rank, plan, error, traceback.format_exc())
            print(
                f"hvd-largebatch bench: run {plan.label} failed on rank {rank}: {type(error).__name__}: {error}",
                file=sys.stderr,
                flush=True,
            )
            raise CellFailed(f"run {plan.label} failed on rank {rank}") from error
        if store is not None:
            store.add(plan, result)
            markers.mark_idle()
            echo(
                f"    {summary_line(result)}; {format_duration(result['seconds'])} "
                f"(study {format_duration(time.perf_counter() - started)} so far)"
            )


def print_line(line: str) -> None:
    """Prints ``line`` with one ``write`` (mpirun tags every write, so text and newline go together)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _rank_from_environment() -> int:
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hvd_largebatch.bench.worker JOB.json``: one rank of a launch; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m hvd_largebatch.bench.worker JOB.json (started by hvd-largebatch bench)", file=sys.stderr)
        return 2
    with open(argv[0]) as stream:
        job = WorkerJob.from_config(json.load(stream))
    try:
        runner = load_runner(job.framework)
    except Exception as error:  # noqa: BLE001 - reported with the rank, then the launch stops
        FailureMarkers(job.out_dir).mark_failed(_rank_from_environment(), None, error, traceback.format_exc())
        raise
    try:
        run_job(job, runner, echo=print_line)
    except CellFailed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
