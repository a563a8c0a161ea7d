"""The worker side of ``hvd-largebatch bench``: runs a sweep's pending cells on every rank.

``horovodrun`` starts ``python -m hvd_largebatch.bench.worker DIR/_run/job.json``
on each rank (or ``hvd-largebatch bench`` itself when the user launched it
under ``horovodrun``). Every rank loads the same cached MNIST-1D and runs the
cells in order through a framework *cell runner*
(``hvd_largebatch.bench.torch_runner`` or ``hvd_largebatch.bench.keras_runner``),
which trains with the package's optimizers, schedules and Horovod glue.

Rank 0 alone prints progress and writes ``results.json`` after each cell; the
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

from hvd_largebatch.bench.data import MNIST1D, MNIST1DSpec, load_mnist1d
from hvd_largebatch.bench.recipes import CellPlan
from hvd_largebatch.bench.results import FailureMarkers, ResultsStore

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
    """What the workers of one launch run.

    Attributes:
        framework: ``"torch"`` or ``"keras"``.
        out_dir: the sweep's output directory.
        data: the MNIST-1D spec (``MNIST1DSpec.to_config()``).
        cells: the pending cells, in order.
        done_before: cells of the sweep already finished (for the ``[k/n]`` counter).
        total: cells in the whole sweep.
    """

    framework: str
    out_dir: str
    data: dict[str, Any]
    cells: tuple[CellPlan, ...]
    done_before: int
    total: int

    def to_config(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "out_dir": self.out_dir,
            "data": self.data,
            "cells": [plan.to_config() for plan in self.cells],
            "done_before": self.done_before,
            "total": self.total,
        }

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> WorkerJob:
        values = dict(values)
        values["cells"] = tuple(CellPlan.from_config(c) for c in values["cells"])
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


def _cell_header(plan: CellPlan, index: int, total: int) -> str:
    width = len(str(total))
    return (
        f"[{index:>{width}}/{total}] {plan.framework} {plan.method:<6} batch {plan.global_batch:>5} "
        f"({plan.per_worker_batch}/worker, {plan.steps_per_epoch} steps/epoch, peak LR {plan.schedule.peak:g})"
    )


def _epoch_line(report: Mapping[str, Any]) -> str:
    return (
        f"    epoch {report['epoch']:>3}/{report['epochs']}  train loss {report['train_loss']:.4f}  "
        f"test acc {100 * report['test_accuracy']:6.2f}%  lr {report['lr']:.4g}  {report['seconds']:.1f} s"
    )


def run_job(job: WorkerJob, runner: CellRunner, *, echo: Callable[[str], None] = print) -> None:
    """Runs ``job``'s cells on this rank; rank 0 prints and stores each result.

    A cell's result (from the runner) holds at least ``test_accuracy``,
    ``test_loss``, ``train_loss`` (last epoch's mean), ``history`` (one dict
    per epoch: ``epoch``, ``train_loss``, ``test_accuracy``, ``test_loss``,
    ``lr``, ``seconds``) and ``seconds`` (training wall time).

    Raises:
        CellFailed: after writing this rank's failure marker, when a cell raises.
    """
    rank = runner.rank
    markers = FailureMarkers(job.out_dir)
    store = ResultsStore(job.out_dir) if rank == 0 else None
    data = load_mnist1d(MNIST1DSpec.from_config(job.data))
    started = time.perf_counter()
    for offset, plan in enumerate(job.cells):
        index = job.done_before + offset + 1
        on_epoch: EpochCallback | None = None
        if rank == 0:
            markers.mark_running(plan, index, job.total)
            echo(_cell_header(plan, index, job.total))
            on_epoch = lambda report: echo(_epoch_line(report))  # noqa: E731
        try:
            result = runner.run_cell(plan, data, on_epoch)
        except Exception as error:  # noqa: BLE001 - any failure stops the sweep, naming the cell
            markers.mark_failed(rank, plan, error, traceback.format_exc())
            print(
                f"hvd-largebatch bench: cell {plan.label} failed on rank {rank}: {type(error).__name__}: {error}",
                file=sys.stderr,
                flush=True,
            )
            raise CellFailed(f"cell {plan.label} failed on rank {rank}") from error
        if store is not None:
            store.add(plan, result)
            markers.mark_idle()
            echo(
                f"    done: test acc {100 * result['test_accuracy']:.2f}% in {format_duration(result['seconds'])} "
                f"(sweep {format_duration(time.perf_counter() - started)} so far)"
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
