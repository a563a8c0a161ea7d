"""The examples in the torch_impl docstrings run and print what they say (STYLE.md: an example that runs)."""

from __future__ import annotations

import pytest
from docstring_examples import check_docstring_examples

MODULES = [
    "sgd", "lars", "clars", "lamb", "optimizer_factory", "warmup_scheduler", "per_example_norms",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    check_docstring_examples(f"hvd_largebatch.torch_impl.{name}")
