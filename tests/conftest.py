"""Shared set-up of the whole suite: the optimizer table is importable everywhere, and its use is counted.

``tests/`` is put on ``sys.path`` so the torch and Keras tests import the one
table of optimizer cases (``optimizer_cases.py``). When a run collects both
frameworks' oracle-parity tests in full, the number of distinct table rows the
Keras test runs against the oracle must be at least the torch test's: the
Keras coverage cannot silently fall behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

#: (test file, test function) of each framework's float64 oracle-parity test over the table.
PARITY_TESTS = {
    "torch": ("test_torch_oracle_parity.py", "test_matches_reference_for_20_steps"),
    "keras": ("test_keras_optimizer_parity.py", "test_float64_parity_with_the_oracle_over_20_steps"),
}


def parity_case_ids(items) -> dict[str, set[str]]:
    """Distinct table rows (``Case.id``) each framework's parity test will run, from the collected items."""
    found: dict[str, set[str]] = {framework: set() for framework in PARITY_TESTS}
    for item in items:
        for framework, (filename, function) in PARITY_TESTS.items():
            if item.path.name == filename and item.originalname == function:
                found[framework].add(item.callspec.params["case"].id)
    return found


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if config.option.keyword or config.option.markexpr or config.getoption("deselect"):
        return  # a deliberate selection: counts say nothing
    found = parity_case_ids(session.items)
    if found["torch"] and found["keras"] and len(found["keras"]) < len(found["torch"]):
        missing = sorted(found["torch"] - found["keras"])
        raise pytest.UsageError(
            f"the Keras oracle-parity test runs {len(found['keras'])} table rows, fewer than torch's "
            f"{len(found['torch'])}; missing: {missing}"
        )
