"""The batch-size sweep behind ``hvd-largebatch bench``: plan it, run it under Horovod, resume it, report it.

For each method of :mod:`hvd_largebatch.recipes` and each global batch size,
one *cell* trains the 1-D CNN on MNIST-1D for the same number of epochs under
Horovod and records the test accuracy. Two ways to run it:

* ``hvd-largebatch bench ...`` (the usual one) plans the sweep, generates and
  caches the data, then launches ``horovodrun -np W -H localhost:W --gloo``
  on :mod:`hvd_largebatch.bench_worker` itself and shows rank 0's progress;
* ``horovodrun -np W ... hvd-largebatch bench ...`` runs the sweep inside
  that launch (detected from Horovod's environment variables): rank 0 plans
  and broadcasts the job.

Either way the output directory holds ``results.json`` (rewritten after
every cell; a rerun keeps finished cells), ``results.csv``, ``table.md`` and
``accuracy_vs_batch.png`` (see :mod:`hvd_largebatch.bench_results` and
:mod:`hvd_largebatch.bench_report`). A failing worker stops the sweep; the
launcher prints which cell failed, on which rank, and why.

This module is framework-free: the frameworks are only imported by the
workers, through the runner modules named in
:data:`hvd_largebatch.bench_worker.RUNNER_MODULES`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hvd_largebatch import bench_report
from hvd_largebatch.bench_results import RUN_DIRECTORY, FailureMarkers, ResultsStore, write_json_atomically
from hvd_largebatch.bench_worker import RUNNER_MODULES, CellFailed, WorkerJob, load_runner, run_job
from hvd_largebatch.config import check_choice, check_positive, check_positive_int
from hvd_largebatch.data import MNIST1DSpec, load_mnist1d
from hvd_largebatch.recipes import BASE_BATCH, METHOD_NAMES, CellPlan, plan_cell, recipe_for

__all__ = [
    "FRAMEWORKS",
    "BACKENDS",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_EPOCHS",
    "DEFAULT_WORKERS",
    "SweepSettings",
    "plan_sweep",
    "inside_horovodrun",
    "horovodrun_command",
    "launch_sweep",
    "lost_gloo_connection",
    "run_sweep_inside_horovodrun",
    "failure_message",
]

FRAMEWORKS = tuple(RUNNER_MODULES)
BACKENDS = ("gloo", "mpi")
DEFAULT_BATCH_SIZES = (128, 512, 2048, 8192)
DEFAULT_EPOCHS = 5
DEFAULT_WORKERS = 2

Echo = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What every cell of a sweep shares; a resumed sweep must have the same settings.

    Attributes:
        epochs: passes over the training set per cell.
        workers: Horovod processes.
        seed: model-initialisation and data-order seed (the same for every cell).
        data: the MNIST-1D spec.
        base_batch: the batch the base LRs refer to.
        base_lrs: ``(method, lr)`` overrides of :data:`hvd_largebatch.recipes.BASE_LRS`.
    """

    epochs: int
    workers: int = DEFAULT_WORKERS
    seed: int = 0
    data: MNIST1DSpec = dataclasses.field(default_factory=MNIST1DSpec)
    base_batch: int = BASE_BATCH
    base_lrs: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", check_positive_int("epochs", self.epochs))
        object.__setattr__(self, "workers", check_positive_int("workers", self.workers))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "base_batch", check_positive_int("base_batch", self.base_batch))
        overrides = dict(self.base_lrs)
        for method, lr in overrides.items():
            check_choice("base_lrs method", method, METHOD_NAMES)
            overrides[method] = check_positive(f"base LR of {method}", lr)
        object.__setattr__(self, "base_lrs", tuple(sorted(overrides.items())))

    def to_config(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "workers": self.workers,
            "seed": self.seed,
            "data": self.data.to_config(),
            "base_batch": self.base_batch,
            "base_lrs": dict(self.base_lrs),
        }


def plan_sweep(
    framework: str, methods: Sequence[str], batch_sizes: Sequence[int], settings: SweepSettings
) -> list[CellPlan]:
    """Every cell of the sweep, method by method, batch sizes ascending.

    Raises:
        ValueError: naming ``framework``, ``methods`` or ``batch_sizes`` (unknown,
            repeated or empty), or a batch the data or the workers cannot make.
    """
    check_choice("framework", framework, FRAMEWORKS)
    methods = list(methods)
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be a non-empty list without repeats, got {methods!r}")
    for method in methods:
        check_choice("methods", method, METHOD_NAMES)
    batches = [check_positive_int("batch_sizes", b) for b in batch_sizes]
    if not batches or len(set(batches)) != len(batches):
        raise ValueError(f"batch_sizes must be a non-empty list without repeats, got {list(batch_sizes)!r}")
    overrides = dict(settings.base_lrs)
    plans = []
    for method in methods:
        recipe = recipe_for(method, overrides.get(method))
        for batch in sorted(batches):
            if batch % settings.workers:
                raise ValueError(
                    f"batch_sizes must be multiples of workers={settings.workers} (each worker takes an equal "
                    f"share of the global batch); got {batch}"
                )
            if batch > settings.data.train_size:
                raise ValueError(
                    f"batch_sizes must be at most the training set size {settings.data.train_size}; got {batch}"
                )
            plans.append(
                plan_cell(
                    recipe, framework=framework, global_batch=batch, world_size=settings.workers,
                    epochs=settings.epochs, train_size=settings.data.train_size, seed=settings.seed,
                    base_batch=settings.base_batch,
                )
            )
    return plans


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
    """``horovodrun -np W -H localhost:W --gloo|--mpi python -m hvd_largebatch.bench_worker JOB``."""
    check_choice("backend", backend, BACKENDS)
    workers = check_positive_int("workers", workers)
    command = [_horovodrun_path(), "-np", str(workers), "-H", f"localhost:{workers}", f"--{backend}"]
    if backend == "mpi":
        command.append("--mpi-args=--oversubscribe")
    return command + [sys.executable, "-m", "hvd_largebatch.bench_worker", str(job_path)]


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
    framework: str, plans: list[CellPlan], settings: SweepSettings, out_dir: Path, command_text: str, echo: Echo
) -> tuple[ResultsStore, WorkerJob]:
    """Checks and records the settings, pre-generates the data and returns the job of the pending cells."""
    store = ResultsStore(out_dir)
    store.adopt_settings(settings.to_config())
    store.add_command(command_text)
    store.save()
    finished, pending, changed = store.split(plans)
    echo(
        f"hvd-largebatch bench: {framework}, {len(plans)} cells ({len(finished)} already finished), "
        f"{settings.epochs} epoch(s) each, {settings.workers} workers; output in {out_dir}"
    )
    for plan in changed:
        echo(f"  re-running {plan.label}: its stored recipe differs from the current one")
    load_mnist1d(settings.data, log=lambda line: echo(f"  {line}"))
    job = WorkerJob(
        framework=framework,
        out_dir=str(out_dir),
        data=settings.data.to_config(),
        cells=tuple(pending),
        done_before=len(finished),
        total=len(plans),
    )
    return store, job


def _finish(out_dir: Path, echo: Echo) -> None:
    store = ResultsStore(out_dir)
    text = bench_report.write_reports(store)
    echo("")
    echo(text.rstrip())
    echo("")
    echo(
        f"wrote {out_dir / 'results.json'}, {out_dir / bench_report.CSV_FILE}, "
        f"{out_dir / bench_report.TABLE_FILE}, {out_dir / bench_report.PLOT_FILE}"
    )


def lost_gloo_connection(lines: Iterable[str]) -> bool:
    """True when a launch died because Gloo's TCP rendezvous was refused (a transport race, not a cell)."""
    text = "\n".join(lines)
    return "gloo::IoException" in text and "Connection refused" in text


def launch_sweep(
    framework: str,
    plans: list[CellPlan],
    settings: SweepSettings,
    out_dir: str | os.PathLike,
    *,
    backend: str = "gloo",
    command_text: str = "",
    echo: Echo = print,
) -> int:
    """Runs the pending cells under a ``horovodrun`` it starts; returns the exit status (0, or 1 on failure).

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
        store, job = _prepare(framework, plans, settings, out_dir, command_text, echo if attempt == 1 else _quiet)
        if not job.cells:
            break
        markers = FailureMarkers(out_dir)
        markers.clear()
        job_path = out_dir / RUN_DIRECTORY / "job.json"
        write_json_atomically(job_path, job.to_config())
        command = horovodrun_command(job_path, settings.workers, backend)
        echo(f"  launching: {shlex.join(command[:7])} ... ({len(job.cells)} cells to run; full log in {log_path})")
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
    """An echo that drops the line (the second attempt does not repeat the sweep's header)."""


def _write_reports_quietly(out_dir: Path) -> None:
    store = ResultsStore(out_dir)
    if store.records:
        bench_report.write_reports(store)


def run_sweep_inside_horovodrun(
    framework: str,
    build: Callable[[int], tuple[list[CellPlan], SweepSettings]],
    out_dir: str | os.PathLike,
    *,
    command_text: str = "",
    echo: Echo = print,
) -> int:
    """Runs the sweep in the current ``horovodrun`` launch (every rank calls this).

    Args:
        framework: ``"torch"`` or ``"keras"``.
        build: given the world size, returns the plans and settings (called on rank 0 only).
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
            plans, settings = build(runner.size)
            _, job = _prepare(framework, plans, settings, out_dir, command_text, echo)
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


def parse_base_lrs(text: str | None) -> tuple[tuple[str, float], ...]:
    """``"lars=2,sgd=0.1"`` -> ``(("lars", 2.0), ("sgd", 0.1))``.

    Raises:
        ValueError: naming ``--base-lr`` and the expected form.
    """
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        method, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((method.strip(), float(value)))
        except ValueError:
            raise ValueError(f"--base-lr must look like METHOD=LR[,METHOD=LR...], got {text!r}") from None
    return tuple(pairs)


def parse_int_list(text: str, argument: str) -> list[int]:
    """``"128,512"`` -> ``[128, 512]``; raises ValueError naming ``argument``."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{argument} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{argument} must hold at least one integer, got {text!r}")
    return values


def parse_name_list(text: str, argument: str, allowed: Iterable[str]) -> list[str]:
    """``"sgd,lars"`` -> ``["sgd", "lars"]``; raises ValueError naming ``argument`` and the allowed names."""
    allowed = tuple(allowed)
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f"{argument} must be a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return names
