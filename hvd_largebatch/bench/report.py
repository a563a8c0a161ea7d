"""The reports of a batch-size sweep: results.csv, table.md and accuracy_vs_batch.png.

All three are written from ``results.json`` (:class:`~hvd_largebatch.bench.results.ResultsStore`),
so they can be regenerated at any time and always agree with it:

* ``results.csv``: one row per finished cell, every hyperparameter and result;
* ``table.md``: per framework, test accuracy (rows: methods, columns: global
  batch), the wall time per cell, and the recipes with every hyperparameter;
* ``accuracy_vs_batch.png``: test accuracy against global batch (log scale),
  one line per method, one panel per framework (matplotlib, imported here only).

Standard library only, apart from matplotlib inside :func:`write_plot`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hvd_largebatch.bench.recipes import METHOD_NAMES
from hvd_largebatch.bench.results import ResultsStore

__all__ = [
    "CSV_FILE",
    "TABLE_FILE",
    "PLOT_FILE",
    "CSV_COLUMNS",
    "is_diverged",
    "accuracy_grid",
    "format_table",
    "write_csv",
    "write_table",
    "write_plot",
    "write_reports",
]

CSV_FILE = "results.csv"
TABLE_FILE = "table.md"
PLOT_FILE = "accuracy_vs_batch.png"
_FRAMEWORK_ORDER = ("torch", "keras")

CSV_COLUMNS = (
    "framework", "method", "global_batch", "per_worker_batch", "workers", "epochs", "steps_per_epoch",
    "total_steps", "optimizer", "base_lr", "base_batch", "scaling", "peak_lr", "warmup_steps", "schedule",
    "test_accuracy", "test_loss", "train_loss", "best_test_accuracy", "diverged", "skipped_steps", "seconds",
    "optimizer_config", "conadv", "finished_at",
)


def _method_order(method: str) -> tuple[int, str]:
    return (METHOD_NAMES.index(method) if method in METHOD_NAMES else len(METHOD_NAMES), method)


def _framework_order(framework: str) -> tuple[int, str]:
    return (_FRAMEWORK_ORDER.index(framework) if framework in _FRAMEWORK_ORDER else 9, framework)


def is_diverged(result: Mapping[str, Any]) -> bool:
    """True when the last epoch's training loss is not finite."""
    loss = result.get("train_loss")
    return loss is None or not math.isfinite(float(loss))


def _csv_row(record: Mapping[str, Any]) -> dict[str, Any]:
    plan, result = record["plan"], record["result"]
    schedule = plan["schedule"]
    return {
        "framework": plan["framework"],
        "method": plan["method"],
        "global_batch": plan["global_batch"],
        "per_worker_batch": plan["per_worker_batch"],
        "workers": plan["world_size"],
        "epochs": plan["epochs"],
        "steps_per_epoch": plan["steps_per_epoch"],
        "total_steps": schedule["total_steps"],
        "optimizer": plan["optimizer"],
        "base_lr": plan["base_lr"],
        "base_batch": plan["base_batch"],
        "scaling": plan["scaling"],
        "peak_lr": schedule["peak"],
        "warmup_steps": schedule["warmup_steps"],
        "schedule": _describe_schedule(schedule),
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "train_loss": result["train_loss"],
        "best_test_accuracy": max((h["test_accuracy"] for h in result.get("history", [])), default=result["test_accuracy"]),
        "diverged": is_diverged(result),
        "skipped_steps": result.get("skipped_steps", 0),
        "seconds": round(float(result["seconds"]), 2),
        "optimizer_config": json.dumps(plan["optimizer_config"], sort_keys=True),
        "conadv": "" if plan["conadv"] is None else json.dumps(plan["conadv"], sort_keys=True),
        "finished_at": record.get("finished_at", ""),
    }


def _sorted_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(
        records,
        key=lambda r: (_framework_order(r["plan"]["framework"]), _method_order(r["plan"]["method"]),
                       r["plan"]["global_batch"]),
    )


def write_csv(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """One row per cell with the columns of ``CSV_COLUMNS``."""
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in _sorted_records(records):
            writer.writerow(_csv_row(record))


def accuracy_grid(
    records: Iterable[Mapping[str, Any]], framework: str
) -> tuple[list[str], list[int], dict[tuple[str, int], Mapping[str, Any]]]:
    """``(methods, batch sizes, {(method, batch): result})`` of one framework, in table order."""
    cells = {
        (r["plan"]["method"], r["plan"]["global_batch"]): r["result"]
        for r in records
        if r["plan"]["framework"] == framework
    }
    methods = sorted({m for m, _ in cells}, key=_method_order)
    batches = sorted({b for _, b in cells})
    return methods, batches, cells


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _describe_schedule(schedule: Mapping[str, Any]) -> str:
    from hvd_largebatch.schedules import Schedule

    return Schedule.from_config(schedule).describe()


def _warmup_text(plan: Mapping[str, Any]) -> str:
    schedule = plan["schedule"]
    if schedule["warmup"] == "none":
        return "none"
    fraction = schedule["warmup_steps"] / schedule["total_steps"]
    return f"gradual from base LR, {100 * fraction:.0f}% of training"


def _decay_text(plan: Mapping[str, Any]) -> str:
    schedule = plan["schedule"]
    if schedule["decay"] == "step":
        epochs = ", ".join(f"{m:g}" for m in schedule["milestones"])
        return f"step x{schedule['gamma']:g} at epochs {epochs}"
    if schedule["decay"] == "poly":
        return f"poly (power {schedule['power']:g}) to {schedule['end_lr']:g}"
    return schedule["decay"]


def _arguments_text(values: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if k not in skip)


def format_table(store: ResultsStore) -> str:
    """The Markdown report (see the module docstring)."""
    records = store.records
    lines = ["# hvd-largebatch bench: MNIST-1D test accuracy against global batch size", ""]
    settings = store.settings or {}
    if store.commands:
        lines += ["Produced by:", ""] + [f"    {command}" for command in store.commands] + [""]
    if settings:
        data = settings.get("data", {})
        lines += [
            f"Every cell trains the same 1-D CNN with BatchNorm (25,322 parameters) on MNIST-1D "
            f"({data.get('train_size', 0):,} train / {data.get('test_size', 0):,} test examples, mnist1d generator, "
            f"seed {data.get('seed')}) for {_epochs_text([settings.get('epochs')])} on {settings.get('workers')} Horovod "
            f"workers, model/data-order seed {settings.get('seed')}; only the recipe changes. Accuracy is on the "
            "test set after the last epoch. Base LRs are set at batch "
            f"{settings.get('base_batch')} and scaled by each recipe's rule.",
            "",
        ]
    frameworks = sorted({r["plan"]["framework"] for r in records}, key=_framework_order)
    if not frameworks:
        lines += ["No cell has finished yet.", ""]
    for framework in frameworks:
        methods, batches, cells = accuracy_grid(records, framework)
        best = {}
        for batch in batches:
            scores = [cells[(m, batch)]["test_accuracy"] for m in methods if (m, batch) in cells]
            best[batch] = max(scores) if scores else None
        rows = []
        for method in methods:
            row = [method]
            for batch in batches:
                result = cells.get((method, batch))
                if result is None:
                    row.append("—")
                    continue
                text = f"{100 * result['test_accuracy']:.2f}"
                if is_diverged(result):
                    text += " (diverged)"
                if result["test_accuracy"] == best[batch]:
                    text = f"**{text}**"
                row.append(text)
            rows.append(row)
        epochs = sorted({r["plan"]["epochs"] for r in records if r["plan"]["framework"] == framework})
        lines += [f"## {framework}: test accuracy (%) after {_epochs_text(epochs)}", ""]
        lines += _markdown_table(["method"] + [str(b) for b in batches], rows, [":--"] + ["--:"] * len(batches))
        steps = {r["plan"]["global_batch"]: r["plan"]["steps_per_epoch"] for r in records
                 if r["plan"]["framework"] == framework}
        lines += [
            "",
            "Best per batch size in bold. Steps per epoch: "
            + ", ".join(f"{steps[b]} at {b}" for b in batches) + ".",
            "",
            f"Wall time per cell ({framework}, seconds):",
            "",
        ]
        time_rows = [[m] + [_seconds_text(cells[(m, b)]["seconds"]) if (m, b) in cells else "—" for b in batches]
                     for m in methods]
        lines += _markdown_table(["method"] + [str(b) for b in batches], time_rows,
                                 [":--"] + ["--:"] * len(batches))
        lines.append("")
    lines += _recipes_section(records)
    return "\n".join(lines).rstrip() + "\n"


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def _epochs_text(epochs: Sequence[int]) -> str:
    return f"{', '.join(map(str, epochs))} epoch{'s' if epochs != [1] else ''}"


def _recipes_section(records: Sequence[Mapping[str, Any]]) -> list[str]:
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_method.setdefault(record["plan"]["method"], []).append(record["plan"])
    if not by_method:
        return []
    lines = ["## Recipes (every hyperparameter)", ""]
    rows = []
    for method in sorted(by_method, key=_method_order):
        plans = sorted(by_method[method], key=lambda p: p["global_batch"])
        plan = plans[0]
        peaks = sorted({(p["global_batch"], p["schedule"]["peak"]) for p in plans})
        optimizer = f"{plan['optimizer']}({_arguments_text(plan['optimizer_config'], skip=('lr',))})"
        if plan["conadv"] is not None:
            optimizer += f" + ConAdv({_arguments_text(plan['conadv'])})"
        rows.append([
            method,
            optimizer,
            f"{plan['base_lr']:g} @ {plan['base_batch']}",
            plan["scaling"],
            ", ".join(f"{peak:.4g} @ {batch}" for batch, peak in peaks),
            _warmup_text(plan),
            _decay_text(plan),
        ])
    lines += _markdown_table(
        ["method", "optimizer (core spelling)", "base LR", "scaling", "peak LR", "warmup", "decay"],
        rows, [":--"] * 7,
    )
    lines += [
        "",
        "BatchNorm scales/offsets and biases are excluded from weight decay and from layer adaptation "
        "(the default exclusion rule). Every method uses the package's own optimizer, schedule, "
        "DistributedOptimizer and broadcast, exactly as the examples do.",
        "",
    ]
    return lines


def write_table(store: ResultsStore, path: str | os.PathLike) -> str:
    """Writes :func:`format_table`'s Markdown to ``path`` and returns it."""
    text = format_table(store)
    Path(path).write_text(text)
    return text


def write_plot(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Test accuracy against global batch, one line per method, one panel per framework."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frameworks = sorted({r["plan"]["framework"] for r in records}, key=_framework_order) or ["torch"]
    figure = Figure(figsize=(5.5 * len(frameworks), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(frameworks), squeeze=False)[0]
    for axis, framework in zip(axes, frameworks):
        methods, batches, cells = accuracy_grid(records, framework)
        for method in methods:
            points = [(b, 100 * cells[(method, b)]["test_accuracy"]) for b in batches if (method, b) in cells]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        axis.set_xscale("log", base=2)
        if batches:
            axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_xlabel("global batch size")
        axis.set_ylabel("test accuracy (%)")
        epochs = sorted({r["plan"]["epochs"] for r in records if r["plan"]["framework"] == framework})
        axis.set_title(f"MNIST-1D, {framework}, {_epochs_text(epochs)}")
        axis.grid(True, alpha=0.3)
        if methods:
            axis.legend(loc="lower left", fontsize="small")
    figure.savefig(path, dpi=120)


def write_reports(store: ResultsStore) -> str:
    """Writes results.csv, table.md and accuracy_vs_batch.png next to results.json; returns the table."""
    out = store.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_csv(store.records, out / CSV_FILE)
    text = write_table(store, out / TABLE_FILE)
    write_plot(store.records, out / PLOT_FILE)
    return text
