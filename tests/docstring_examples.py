"""Runs the examples in a module's docstrings (STYLE.md: an example that runs), for the core, torch and Keras tests."""

from __future__ import annotations

import doctest
import importlib


def check_docstring_examples(module_name: str, *, require_example: bool = True) -> None:
    """Imports ``module_name`` and runs its doctests; fails on a failed example, or on none when one is required."""
    module = importlib.import_module(module_name)
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0, f"{module_name}: {failures} of {tried} docstring examples failed"
    if require_example:
        assert tried > 0, f"{module_name} has no runnable example"
