"""The examples in hvd_largebatch.tf's docstrings run and print what they say (STYLE.md: an example that runs)."""

from __future__ import annotations

import doctest
import importlib

import pytest

# Modules whose docstrings hold runnable examples (DistributedOptimizer's needs horovodrun and is skipped there).
MODULES = [
    "momentum_optimizers", "lamb", "optimizer_factory", "schedule_adapter", "callbacks", "clars_model", "core_spelling",
    "batchnorm_statistics",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"hvd_largebatch.tf.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
