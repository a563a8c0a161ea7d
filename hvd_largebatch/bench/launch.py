"""Runs the batch-size study under Horovod, resumes it, and reports it: ``hvd-largebatch bench``.

The study (:mod:`hvd_largebatch.bench.study`) is a list of runs per (method,
global batch) cell: tuning trials, repeats of the best one with new seeds, a
fixed-epoch run. Two ways to run it:

* ``hvd-largebatch bench ...`` (the usual one) checks the settings, generates
  and caches the data, then launches ``horovodrun -np W -H localhost:W --gloo``
  on :mod:`hvd_largebatch.bench.worker` itself and shows rank 0's progress;
* ``horovodrun -np W ... hvd-largebatch bench ...`` runs the study inside
  that launch (detected from Horovod's environment variables).

Either way one launch runs every remaining run, rank 0 choosing each next one
from the finished ones (:func:`hvd_largebatch.bench.study.next_run`), and the
output directory holds ``results.json`` (rewritten after every run; a rerun
of the same command resumes) and the reports of :mod:`hvd_largebatch.bench.report`.
A failing worker stops the study; the launcher prints which run failed, on
which rank, and why.

This module is framework-free: the frameworks are only imported by the
workers, through the runner modules named in
:data:`hvd_largebatch.bench.worker.RUNNER_MODULES`.
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hvd_largebatch.bench.atomic_file import write_json_atomically
from hvd_largebatch.bench import report
from hvd_largebatch.bench.data import load_mnist1d
from hvd_largebatch.bench.study import StudySettings, next_run, runs_per_cell, tuning_runs
from hvd_largebatch.bench.results import RUN_DIRECTORY, FailureMarkers, ResultsStore
from hvd_largebatch.bench.worker import CellFailed, WorkerJob, load_runner, run_job
from hvd_largebatch.config import check_choice, check_positive_int

__all__ = [
    "BACKENDS",
    "inside_horovodrun",
    "horovodrun_command",
    "launch_study",
    "lost_gloo_connection",
    "run_study_inside_horovodrun",
    "failure_message",
]

BACKENDS = ("gloo", "mpi")

Echo = Callable[[str], None]


def inside_horovodrun(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process is a rank started by ``horovodrun`` (Gloo) or ``mpirun``."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def _horovodrun_path() -> str:
    beside_python = Path(sys.executable).with_name("horovodrun")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("horovodrun")
    if not found:
        raise ValueError("horovodrun was not found next to this Python or on PATH: run `make setup` to build Horovod")
    return found


def horovodrun_command(job_path: str | os.PathLike, workers: int, backend: str = "gloo") -> list[str]:
    """``horovodrun -np W -H localhost:W --gloo|--mpi python -m hvd_largebatch.bench.worker JOB``."""
    check_choice("backend", backend, BACKENDS)
    workers = check_positive_int("workers", workers)
    command = [_horovodrun_path(), "-np", str(workers), "-H", f"localhost:{workers}", f"--{backend}"]
    if backend == "mpi":
        command.append("--mpi-args=--oversubscribe")
    return command + [sys.executable, "-m", "hvd_largebatch.bench.worker", str(job_path)]


def _worker_environment(workers: int, backend: str) -> dict[str, str]:
    env = dict(os.environ)
    # The workers share the machine's cores: one thread pool of cores/W each.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONUNBUFFERED"] = "1"
    if backend == "mpi":
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


#: A worker's line as horovodrun shows it: ``[rank]<stdout>:`` (Gloo) or ``[job,rank]<stdout>:`` (MPI).
_RANK_LINE = re.compile(r"^\[(?:\d+,)?(\d+)\]<(stdout|stderr)>:(.*)$")


def _stream_horovodrun(command: list[str], env: dict[str, str], log_path: Path, echo: Echo) -> tuple[int, list[str]]:
    """Runs ``command``; shows rank 0's stdout, logs everything; returns ``(status, last lines)``."""
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with open(log_path, "a") as log, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    ) as process:
        log.write(f"$ {shlex.join(command)}\n")
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                text = line.rstrip("\n")
                match = _RANK_LINE.match(text)
                if match and match.group(1) == "0" and match.group(2) == "stdout":
                    echo(match.group(3))
                else:
                    tail.append(text)
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
            raise
        return process.wait(), list(tail)


def failure_message(
    status: int, markers: FailureMarkers, finished: int, results_path: Path, log_path: Path, tail: Sequence[str] = ()
) -> str:
    """The one-paragraph explanation printed when the workers stop early."""
    cause = markers.first_cause()
    if cause is not None:
        head = (
            f"hvd-largebatch bench: stopped: cell {cause['label']} failed on rank {cause['rank']}: "
            f"{cause['error_type']}: {cause['error']}"
        )
    elif (running := markers.running()) is not None:
        head = (
            f"hvd-largebatch bench: stopped: the workers exited with status {status} during cell "
            f"{running['label']} without a Python error (killed or crashed?)"
        )
    else:
        last = "\n    ".join(line for line in tail if line.strip())[-2000:]
        head = f"hvd-largebatch bench: stopped: horovodrun exited with status {status} before any cell started"
        if last:
            head += f"; its last lines:\n    {last}"
    return (
        f"{head}\n{finished} finished cell(s) are kept in {results_path}; rerun the same command to resume. "
        f"Full log: {log_path}"
    )


def _prepare(
    framework: str, methods: Sequence[str], batch_sizes: Sequence[int], settings: StudySettings, out_dir: Path,
    command_text: str, echo: Echo,
) -> tuple[ResultsStore, WorkerJob, bool]:
    """Checks and records the settings, pre-generates the data; returns the job and whether runs remain."""
    store = ResultsStore(out_dir)
    store.adopt_settings(settings.to_config())
    store.add_command(command_text)
    store.save()
    for method in methods:  # every cell must be runnable before anything starts
        for batch in batch_sizes:
            tuning_runs(framework, method, batch, settings)
    total = len(methods) * len(batch_sizes) * runs_per_cell(settings)
    finished = sum(1 for r in store.records if r["plan"]["framework"] == framework)
    echo(
        f"hvd-largebatch bench: {framework} study, {len(methods)} method(s) x {len(batch_sizes)} batch size(s) x "
        f"{runs_per_cell(settings)} runs ({settings.search.trials} trials, {settings.seeds} repeats"
        f"{', 1 fixed-epoch run' if settings.epochs else ''}) = {total} runs ({finished} already finished), "
        f"targets {', '.join(f'{100 * t:g}%' for t in settings.targets)} on {settings.validation_size} validation "
        f"examples, {settings.workers} workers; output in {out_dir}"
    )
    load_mnist1d(settings.data, log=lambda line: echo(f"  {line}"))
    job = WorkerJob(
        framework=framework,
        out_dir=str(out_dir),
        settings=settings.to_config(),
        methods=tuple(methods),
        batch_sizes=tuple(sorted(batch_sizes)),
    )
    remaining = next_run(framework, job.methods, job.batch_sizes, settings, store.records) is not None
    return store, job, remaining


def _finish(out_dir: Path, echo: Echo) -> None:
    store = ResultsStore(out_dir)
    text = report.write_reports(store)
    echo("")
    echo(text.rstrip())
    echo("")
    echo(
        f"wrote {out_dir / 'results.json'}, {out_dir / report.SUMMARY_FILE}, {out_dir / report.CSV_FILE}, "
        f"{out_dir / report.TABLE_FILE}, {out_dir / report.PLOT_FILE}, {out_dir / report.NOISE_PLOT_FILE}"
    )


def lost_gloo_connection(lines: Iterable[str]) -> bool:
    """True when a launch died because Gloo's TCP rendezvous was refused (a transport race, not a cell)."""
    text = "\n".join(lines)
    return "gloo::IoException" in text and "Connection refused" in text


def launch_study(
    framework: str,
    methods: Sequence[str],
    batch_sizes: Sequence[int],
    settings: StudySettings,
    out_dir: str | os.PathLike,
    *,
    backend: str = "gloo",
    command_text: str = "",
    echo: Echo = print,
) -> int:
    """Runs the study's remaining runs under a ``horovodrun`` it starts; returns the exit status (0, or 1 on failure).

    A launch whose Gloo rendezvous connection was refused (another job took
    the port on a busy machine) and in which no cell raised is started once
    more; finished cells are kept, so the second launch resumes.

    Raises:
        ValueError: settings that contradict ``out_dir``'s results, or no ``horovodrun``.
    """
    out_dir = Path(out_dir)
    check_choice("backend", backend, BACKENDS)
    log_path = out_dir / "sweep.log"
    for attempt in (1, 2):
        store, job, remaining = _prepare(
            framework, methods, batch_sizes, settings, out_dir, command_text, echo if attempt == 1 else _quiet
        )
        if not remaining:
            break
        markers = FailureMarkers(out_dir)
        markers.clear()
        job_path = out_dir / RUN_DIRECTORY / "job.json"
        write_json_atomically(job_path, job.to_config())
        command = horovodrun_command(job_path, settings.workers, backend)
        echo(f"  launching: {shlex.join(command[:7])} ... (full log in {log_path})")
        try:
            status, tail = _stream_horovodrun(command, _worker_environment(settings.workers, backend), log_path, echo)
        except KeyboardInterrupt:
            finished = len(ResultsStore(out_dir).records)
            print(
                f"hvd-largebatch bench: interrupted; {finished} finished cell(s) are kept in {store.path}; "
                "rerun the same command to resume",
                file=sys.stderr,
            )
            _write_reports_quietly(out_dir)
            return 130
        if status == 0:
            break
        if attempt == 1 and markers.first_cause() is None and lost_gloo_connection(tail):
            echo("  Gloo's rendezvous connection was refused (a busy machine); launching once more")
            continue
        finished = len(ResultsStore(out_dir).records)
        print(failure_message(status, markers, finished, store.path, log_path, tail), file=sys.stderr)
        _write_reports_quietly(out_dir)
        return 1
    _finish(out_dir, echo)
    return 0


def _quiet(line: str) -> None:
    """An echo that drops the line (the second attempt does not repeat the study's header)."""


def _write_reports_quietly(out_dir: Path) -> None:
    store = ResultsStore(out_dir)
    if store.records:
        report.write_reports(store)


def run_study_inside_horovodrun(
    framework: str,
    build: Callable[[int], tuple[list[str], list[int], StudySettings]],
    out_dir: str | os.PathLike,
    *,
    command_text: str = "",
    echo: Echo = print,
) -> int:
    """Runs the study in the current ``horovodrun`` launch (every rank calls this).

    Args:
        framework: ``"torch"`` or ``"keras"``.
        build: given the world size, returns the methods, batch sizes and settings (called on rank 0 only).
        out_dir: the output directory (written by rank 0 only).

    Returns:
        0, 1 when a cell failed, 2 when rank 0 refused the arguments (it
        raises the ValueError; the other ranks return 2 quietly).
    """
    out_dir = Path(out_dir)
    runner = load_runner(framework)
    rank = runner.rank
    message: dict[str, Any] | None = None
    error: ValueError | None = None
    if rank == 0:
        try:
            methods, batch_sizes, settings = build(runner.size)
            _, job, _ = _prepare(framework, methods, batch_sizes, settings, out_dir, command_text, echo)
            FailureMarkers(out_dir).clear()
            message = {"job": job.to_config()}
        except ValueError as err:
            error = err
            message = {"error": str(err)}
    message = runner.broadcast_object(message)
    if "error" in message:
        if error is not None:
            raise error
        return 2
    job = WorkerJob.from_config(message["job"])
    try:
        run_job(job, runner, echo=echo if rank == 0 else (lambda line: None))
    except CellFailed:
        return 1
    if rank == 0:
        _finish(out_dir, echo)
    return 0
