"""Runs a worker script under ``horovodrun -np 2`` and collects each rank's results.

A parallel test launches one worker script per backend; the worker runs many
checks in one process start-up (TensorFlow and PyTorch are slow to import) and
calls :func:`write_results` with a JSON-able dict. The test then asserts on
the list of per-rank dicts that :func:`run_under_horovod` returns, computing
its expectations from rank and size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS_ENV = "HVD_LB_RESULTS_DIR"
BACKENDS = ("gloo", "mpi")


def horovodrun_path() -> str:
    """The ``horovodrun`` next to the running Python (the project's venv)."""
    candidate = Path(sys.executable).with_name("horovodrun")
    found = str(candidate) if candidate.exists() else shutil.which("horovodrun")
    if not found:
        raise AssertionError("horovodrun not found: run `make setup` to build and install Horovod")
    return found


def run_under_horovod(
    script: str | os.PathLike,
    *script_args: str,
    backend: str = "gloo",
    np: int = 2,
    timeout: float = 900,
    env: dict[str, str] | None = None,
    hosts: str | None = None,
) -> list[dict]:
    """Runs ``script`` on ``np`` local ranks and returns the per-rank results, rank order.

    ``hosts`` is horovodrun's ``-H`` (default ``localhost:np``); ``localhost``
    and ``127.0.0.1`` are two host names of this machine, so
    ``localhost:2,127.0.0.1:2`` runs two "nodes" of two ranks each.

    Raises:
        AssertionError: with the tail of the output when the launch fails or a
            rank wrote no results.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with tempfile.TemporaryDirectory(prefix="hvd_lb_parallel_") as results_dir:
        run_env = {**os.environ, **(env or {}), RESULTS_ENV: results_dir}
        run_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        run_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        run_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # Each rank gets one core's worth of threads; two ranks share two cores.
        run_env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [
            horovodrun_path(), "-np", str(np), "-H", hosts or f"localhost:{np}", f"--{backend}",
            sys.executable, str(script), *script_args,
        ]
        if backend == "mpi":
            cmd[1:1] = ["--mpi-args=--oversubscribe --allow-run-as-root"]
        for attempt in range(2):
            proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=timeout)
            output = (proc.stdout + proc.stderr)[-6000:]
            # Gloo's TCP rendezvous can lose a race for a port to another job on a busy machine, or
            # time out connecting when a rank starts late under heavy load; that is the transport,
            # not the code under test, so such a launch is tried once more.
            if proc.returncode == 0 or not _lost_gloo_connection(output):
                break
            print(f"launcher: Gloo could not connect, launching {Path(script).name} again", file=sys.stderr)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output}")
        results = []
        for rank in range(np):
            path = Path(results_dir) / f"rank{rank}.json"
            if not path.exists():
                raise AssertionError(f"rank {rank} wrote no results ({path}):\n{output}")
            results.append(json.loads(path.read_text()))
        return results


def _lost_gloo_connection(output: str) -> bool:
    return "gloo::IoException" in output and ("Connection refused" in output or "Connect timeout" in output)


def write_results(rank: int, results: dict) -> None:
    """Called by a worker: stores this rank's results for the launching test."""
    directory = os.environ.get(RESULTS_ENV)
    if not directory:
        raise RuntimeError(f"{RESULTS_ENV} is not set: run this worker through run_under_horovod")
    Path(directory, f"rank{rank}.json").write_text(json.dumps(results))


def run_elastic_under_horovod(
    script: str | os.PathLike,
    *script_args: str,
    discovery_script: str | os.PathLike,
    np: int,
    min_np: int,
    max_np: int,
    cooldown: tuple[int, int] | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> list[dict]:
    """Runs ``script`` in Horovod elastic mode (Gloo) and returns the results of every process that wrote some.

    Processes that fail on purpose write nothing; each survivor or newcomer
    calls :func:`write_results` with its final rank, so the list is in final
    rank order.

    Raises:
        AssertionError: with the tail of the output when the launch fails.
    """
    with tempfile.TemporaryDirectory(prefix="hvd_lb_elastic_") as results_dir:
        run_env = {**os.environ, **(env or {}), RESULTS_ENV: results_dir}
        run_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        run_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        run_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        run_env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [
            horovodrun_path(), "-np", str(np), "--min-np", str(min_np), "--max-np", str(max_np),
            "--host-discovery-script", str(discovery_script), "--network-interfaces", "lo",
        ]
        if cooldown is not None:
            cmd += ["--blacklist-cooldown-range", str(cooldown[0]), str(cooldown[1])]
        cmd += [sys.executable, str(script), *script_args]
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=timeout)
        output = (proc.stdout + proc.stderr)[-8000:]
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output}")
        paths = sorted(Path(results_dir).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        if not paths:
            raise AssertionError(f"no process wrote results:\n{output}")
        return [json.loads(path.read_text()) for path in paths]
