"""The core is framework-free: it imports (and the CLI runs) with torch, TensorFlow, Keras and Horovod blocked.

Also runs the docstring examples of the core modules, so they stay true.
"""

from __future__ import annotations

import json

import pytest
from docstring_examples import check_docstring_examples
from framework_blocker import run_blocked

CORE_MODULES = [
    "hvd_largebatch.schedules",
    "hvd_largebatch.config",
    "hvd_largebatch.reference",
    "hvd_largebatch.noise_scale",
    "hvd_largebatch.cli",
    "hvd_largebatch.schedules.elastic",
    "hvd_largebatch.elastic_data",
    "hvd_largebatch.dual_bn_routing",
]


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
        assert abs(schedules.goyal(0.1, 256, 8192, steps_per_epoch=156, epochs=90)(780) - 3.2) < 1e-12
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
    check_docstring_examples(
        module_name, require_example=module_name not in ("hvd_largebatch.cli", "hvd_largebatch.schedule_command")
    )
