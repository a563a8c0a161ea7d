"""The core is framework-free: it imports (and the CLI runs) with torch, TensorFlow, Keras and Horovod blocked.

Also runs the docstring examples of the core modules, so they stay true.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "tensorflow", "keras", "horovod", "jax", "tf_keras")
CORE_MODULES = [
    "hvd_largebatch.schedules",
    "hvd_largebatch.config",
    "hvd_largebatch.reference",
    "hvd_largebatch.noise_scale",
    "hvd_largebatch.cli",
    "hvd_largebatch.schedules.elastic",
    "hvd_largebatch.elastic_data",
]

# Installed before anything else in a fresh interpreter: any import of a blocked
# package (or of one of its submodules) raises ImportError, and is recorded.
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


def run_blocked(body: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=60,
    )


def test_blocker_really_blocks():
    result = run_blocked(
        """
        try:
            import numpy, torch
        except ImportError as err:
            print("blocked:", err)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "blocked: torch is blocked" in result.stdout


def test_core_imports_and_cli_runs_with_frameworks_blocked():
    result = run_blocked(
        """
        import json, sys
        import hvd_largebatch, hvd_largebatch.schedules, hvd_largebatch.config, hvd_largebatch.reference, hvd_largebatch.cli
        import hvd_largebatch.noise_scale
        import hvd_largebatch.schedules.elastic, hvd_largebatch.elastic_data
        from hvd_largebatch import schedules
        assert abs(schedules.goyal(0.1, 256, 8192, steps_per_epoch=156)(780) - 3.2) < 1e-12
        code = hvd_largebatch.cli.main(["schedule", "--base-lr", "0.1", "--global-batch", "8192", "--epochs", "90",
                                        "--dataset-size", "1281167", "--json"])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({"code": code, "attempts": attempts, "loaded": loaded}), file=sys.stderr)
        """
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "attempts": [], "loaded": []}
    assert json.loads(result.stdout)["summary"]["peak"] == pytest.approx(3.2)


@pytest.mark.parametrize("module_name", CORE_MODULES + ["hvd_largebatch.schedule_command"])
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0
    if module_name not in ("hvd_largebatch.cli", "hvd_largebatch.schedule_command"):
        assert tried > 0, f"{module_name} has no runnable example"
