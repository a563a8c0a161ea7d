"""The README's Python snippets that build a schedule recipe pass the run's ``epochs`` (copied into a
10-epoch script, a recipe left at a 90-epoch default would never decay)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
RECIPES = {"goyal": 4, "lars_poly": 4}  # recipe -> position of ``epochs`` among the positional arguments


def python_snippets() -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ```python block of the README."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def recipe_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RECIPES
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "schedules"
    ]


def epochs_argument(call: ast.Call) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == "epochs":
            return keyword.value
    position = RECIPES[call.func.attr]
    return call.args[position] if len(call.args) > position else None


SNIPPETS = [(line, code) for line, code in python_snippets() if recipe_calls(ast.parse(code))]


def test_the_readme_has_recipe_snippets():
    assert len(SNIPPETS) >= 2  # the PyTorch and Keras quick starts


@pytest.mark.parametrize("line, code", SNIPPETS, ids=[f"README.md:{line}" for line, _ in SNIPPETS])
def test_recipe_snippets_pass_the_runs_epochs(line, code):
    tree = ast.parse(code)
    for call in recipe_calls(tree):
        epochs = epochs_argument(call)
        assert epochs is not None, f"README.md:{line}: schedules.{call.func.attr}(...) does not pass epochs"
        if isinstance(epochs, ast.Name):  # the same variable must set the training length
            uses = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and node is not call and (
                any(k.arg == "epochs" and isinstance(k.value, ast.Name) and k.value.id == epochs.id
                    for k in node.keywords)
                or (isinstance(node.func, ast.Name) and node.func.id == "range"
                    and any(isinstance(a, ast.Name) and a.id == epochs.id for a in node.args)))]
            assert uses, f"README.md:{line}: epochs={epochs.id} is not the length of the training loop or fit"
