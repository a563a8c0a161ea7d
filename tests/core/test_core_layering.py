"""The layers import only downwards: core <- framework libraries <- bench app.

* the core and the bench app's framework-free modules import with torch,
  TensorFlow, Keras and Horovod blocked (the app's framework runners and model
  twins are loaded by name, only inside a Horovod worker);
* no module of the framework libraries (``torch_impl/``, ``tf/``) imports the
  bench app, read from their sources with ``ast`` so that a new import fails here;
* the examples use only the public library, never the app.
"""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest
from framework_blocker import REPO, run_blocked

APP = "hvd_largebatch.bench"
#: The app's modules that import a framework: loaded by the worker by name, never at package import.
APP_FRAMEWORK_MODULES = {"torch_runner", "keras_runner", "torch_model", "keras_model"}
#: Source folder -> the dotted package it is installed as (setup.cfg ``package_dir``).
LIBRARIES = {"torch_impl": "hvd_largebatch.torch_impl", "tf": "hvd_largebatch.tf"}


def app_framework_free_modules() -> list[str]:
    names = sorted(path.stem for path in (REPO / "hvd_largebatch" / "bench").glob("*.py"))
    return [f"{APP}.{name}" for name in names if name != "__init__" and name not in APP_FRAMEWORK_MODULES]


def imported_modules(path: Path, package: str) -> list[str]:
    """Every module ``path`` imports (absolute, relative resolved against ``package``), at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def imports_app(module: str) -> bool:
    return module == APP or module.startswith(APP + ".")


def test_the_scan_sees_absolute_relative_and_nested_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        textwrap.dedent(
            """
            import hvd_largebatch.bench.data
            from hvd_largebatch import bench
            from ..bench import plan
            def later():
                from hvd_largebatch.bench.recipes import METHODS
            """
        )
    )
    found = imported_modules(source, "hvd_largebatch.torch_impl")
    flagged = sorted({m for m in found if imports_app(m)})
    assert flagged == [
        "hvd_largebatch.bench",
        "hvd_largebatch.bench.data",
        "hvd_largebatch.bench.plan",
        "hvd_largebatch.bench.recipes",
        "hvd_largebatch.bench.recipes.METHODS",
    ]


@pytest.mark.parametrize("folder", sorted(LIBRARIES))
def test_framework_libraries_never_import_the_bench_app(folder):
    sources = sorted((REPO / folder).rglob("*.py"))
    assert sources, f"no sources under {folder}/"
    offending = {
        str(path.relative_to(REPO)): [m for m in imported_modules(path, LIBRARIES[folder]) if imports_app(m)]
        for path in sources
    }
    assert {path: found for path, found in offending.items() if found} == {}


def test_examples_use_only_the_public_library():
    offending = {}
    for path in sorted((REPO / "examples").glob("*.py")):
        found = [m for m in imported_modules(path, "examples") if m.startswith("hvd_largebatch")]
        private = [m for m in found if imports_app(m) or any(part.startswith("_") for part in m.split("."))]
        if private:
            offending[path.name] = private
    assert offending == {}


def test_core_and_bench_app_import_with_frameworks_blocked():
    modules = ["hvd_largebatch", APP, *app_framework_free_modules(), "hvd_largebatch.cli"]
    assert f"{APP}.plan" in modules and f"{APP}.worker" in modules
    result = run_blocked(
        f"""
        import importlib, json
        for name in {modules!r}:
            importlib.import_module(name)
        parser = importlib.import_module("hvd_largebatch.cli").build_parser()
        parser.parse_args(["bench", "--framework", "keras", "--epochs", "1"])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"attempts": attempts, "loaded": loaded}}))
        """,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"attempts": [], "loaded": []}
