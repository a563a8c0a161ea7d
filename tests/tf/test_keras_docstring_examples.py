"""The examples in hvd_largebatch.tf's docstrings run and print what they say (STYLE.md: an example that runs)."""

from __future__ import annotations

import pytest
from docstring_examples import check_docstring_examples

# Modules whose docstrings hold runnable examples (DistributedOptimizer's needs horovodrun and is skipped there).
MODULES = [
    "momentum_optimizers", "lamb", "optimizer_factory", "schedule_adapter", "callbacks", "clars_model", "core_spelling",
    "batchnorm_statistics",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    check_docstring_examples(f"hvd_largebatch.tf.{name}")
