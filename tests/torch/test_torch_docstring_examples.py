"""The examples in the torch_impl docstrings run and print what they say (STYLE.md: an example that runs)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "sgd", "lars", "clars", "lamb", "optimizer_factory", "warmup_scheduler", "per_example_norms",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"hvd_largebatch.torch_impl.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
