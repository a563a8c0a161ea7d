"""Runs Python code in a fresh interpreter in which torch, TensorFlow, Keras and Horovod cannot be imported.

The core tests use it to prove that the core and the bench app's framework-free
modules never import a framework: any import of a blocked package (or of one of
its submodules) raises ImportError and is recorded in ``attempts``, a list the
code under test can print.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "tensorflow", "keras", "horovod", "jax", "tf_keras")

# Installed before anything else in the fresh interpreter.
BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys
    BLOCKED = {BLOCKED!r}
    attempts = []
    class FrameworkBlocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{{name}} is blocked: the hvd_largebatch core must not import it")
            return None
    sys.meta_path.insert(0, FrameworkBlocker())
    """
)


def run_blocked(body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -c BLOCKER + body`` from the repository root; ``BLOCKED`` and ``attempts`` are defined for ``body``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=timeout,
    )
