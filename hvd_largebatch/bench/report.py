"""The reports of a batch-size study: summary.json, results.csv, table.md, steps_vs_batch.png, noise_scale.png.

All are written from ``results.json`` (:class:`~hvd_largebatch.bench.results.ResultsStore`),
so they can be regenerated at any time and always agree with it:

* ``summary.json``: :func:`analyse`'s result: per framework, method and batch
  every trial, the chosen setting, the steps to each target over the best
  trial and its repeats (median, min, max, how many reached it), the
  examples, ``B_simple``, the fixed-epoch accuracy; per method and target the
  fit ``S(B) = S_min (1 + B_crit/B)``
  (:func:`~hvd_largebatch.bench.scaling_fit.fit_critical_batch` on the medians);
* ``results.csv``: one row per run, every hyperparameter and result;
* ``table.md``: the same as tables a person reads;
* ``steps_vs_batch.png``: median steps to the first target against batch,
  log-log, one line per method with its min-max range and fit, and the
  perfect-scaling line (steps halve when the batch doubles);
* ``noise_scale.png``: ``B_simple`` against step for each method's best runs.

A median over runs that did not all reach the target counts the misses as
"more than any": the median is "not reached" when half or more missed.

Standard library only, apart from matplotlib inside the plot writers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hvd_largebatch.bench.atomic_file import write_json_atomically
from hvd_largebatch.bench.recipes import METHOD_NAMES
from hvd_largebatch.bench.results import ResultsStore, finite_or_none
from hvd_largebatch.bench.run_monitor import target_key
from hvd_largebatch.bench.scaling_fit import fit_critical_batch, predicted_steps
from hvd_largebatch.bench.tuning import best_trial

__all__ = [
    "CSV_FILE",
    "TABLE_FILE",
    "SUMMARY_FILE",
    "PLOT_FILE",
    "NOISE_PLOT_FILE",
    "CSV_COLUMNS",
    "median_and_range",
    "analyse",
    "format_table",
    "write_csv",
    "write_plot",
    "write_noise_plot",
    "write_reports",
]

CSV_FILE = "results.csv"
TABLE_FILE = "table.md"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "steps_vs_batch.png"
NOISE_PLOT_FILE = "noise_scale.png"
_FRAMEWORK_ORDER = ("torch", "keras")

CSV_COLUMNS = (
    "framework", "method", "global_batch", "phase", "trial", "seed", "per_worker_batch", "workers",
    "steps_per_epoch", "horizon_steps", "optimizer", "base_lr", "scaling", "lr_multiplier", "peak_lr",
    "warmup_steps", "warmup_fraction", "schedule", "targets", "steps_to_target", "stopped", "steps",
    "best_validation_accuracy", "final_validation_accuracy", "test_accuracy", "b_simple_at_target",
    "skipped_steps", "seconds", "optimizer_config", "exclusions", "conadv", "finished_at",
)


def _method_order(method: str) -> tuple[int, str]:
    return (METHOD_NAMES.index(method) if method in METHOD_NAMES else len(METHOD_NAMES), method)


def _framework_order(framework: str) -> tuple[int, str]:
    return (_FRAMEWORK_ORDER.index(framework) if framework in _FRAMEWORK_ORDER else 9, framework)


def _study_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r["plan"].get("study")]


def median_and_range(values: Sequence[float | None]) -> dict[str, Any]:
    """``median``, ``min``, ``max`` (of the reached values), ``reached`` and ``runs`` of steps to a target.

    None (not reached) counts as larger than any number; the median is None
    when the middle value(s) are None.

    Example:
        >>> median_and_range([120, None, 100])
        {'median': 120, 'min': 100, 'max': 120, 'reached': 2, 'runs': 3}
    """
    reached = sorted(v for v in values if v is not None)
    ordered: list[float] = reached + [math.inf] * (len(values) - len(reached))
    median: float | None = None
    if ordered:
        middle = statistics.median(ordered)
        median = None if math.isinf(middle) or math.isnan(middle) else middle
    return {
        "median": median,
        "min": reached[0] if reached else None,
        "max": reached[-1] if reached else None,
        "reached": len(reached),
        "runs": len(values),
    }


def _trial_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    plan, result = record["plan"], record["result"]
    return {
        "trial": plan["study"]["trial"],
        "seed": plan["seed"],
        "lr_multiplier": plan["lr_multiplier"],
        "peak_lr": plan["schedule"]["peak"],
        "horizon": plan["schedule"]["total_steps"],
        "warmup_steps": plan["schedule"]["warmup_steps"],
        "warmup_fraction": plan["warmup_fraction"],
        "steps_to_target": result["steps_to_target"],
        "stopped": result["stopped"],
        "steps": result["steps"],
        "best_validation_accuracy": result["best_validation_accuracy"],
        "test_accuracy": result["test_accuracy"],
        "b_simple_at_target": result.get("b_simple_at_target"),
        "seconds": result["seconds"],
    }


def _cell(
    records: Sequence[Mapping[str, Any]], batch: int, targets: Sequence[float], trials: int | None
) -> dict[str, Any]:
    by_phase: dict[str, list[Mapping[str, Any]]] = {"tune": [], "seed": [], "epochs": []}
    for record in records:
        by_phase.setdefault(record["plan"]["study"]["phase"], []).append(record)
    for phase in by_phase.values():
        phase.sort(key=lambda r: (r["plan"]["study"]["trial"], r["plan"]["seed"]))
    trials_expected = trials
    trials = [_trial_summary(r) for r in by_phase["tune"]]
    primary = target_key(targets[0])
    complete = trials_expected is None or len(trials) >= trials_expected
    cell: dict[str, Any] = {"batch": batch, "trials": trials, "tuned": complete, "best_trial": None, "best": None,
                            "steps": {},
                            "examples": {}, "b_simple": None, "fixed_epochs": None,
                            "seconds": sum(float(r["result"]["seconds"]) for r in records)}
    if trials and complete:
        ranked = [{"steps_to_target": t["steps_to_target"].get(primary),
                   "best_accuracy": t["best_validation_accuracy"]} for t in trials]
        best = trials[best_trial(ranked)]
        cell["best_trial"] = best["trial"]
        cell["best"] = {k: best[k] for k in ("lr_multiplier", "peak_lr", "horizon", "warmup_steps", "warmup_fraction")}
        repeats = [best] + [_trial_summary(r) for r in by_phase["seed"] if r["plan"]["study"]["trial"] == best["trial"]]
        for target in targets:
            key = target_key(target)
            spread = median_and_range([t["steps_to_target"].get(key) for t in repeats])
            cell["steps"][key] = spread
            cell["examples"][key] = None if spread["median"] is None else spread["median"] * batch
        noise = [t["b_simple_at_target"] for t in repeats if t["b_simple_at_target"] is not None]
        cell["b_simple"] = statistics.median(noise) if noise else None
        cell["seeds"] = sorted(t["seed"] for t in repeats)
    for record in by_phase["epochs"]:
        result = record["result"]
        cell["fixed_epochs"] = {
            "epochs": record["plan"]["epochs"],
            "test_accuracy": result["test_accuracy"],
            "final_validation_accuracy": result["final_validation_accuracy"],
            "stopped": result["stopped"],
        }
    return cell


def analyse(records: Iterable[Mapping[str, Any]], trials: int | None = None) -> dict[str, Any]:
    """The study's numbers from the stored runs: per framework, method and batch, and the fits.

    Args:
        records: the stored runs (``ResultsStore.records``).
        trials: tuning trials per cell (the study's ``search.trials``); a cell with fewer
            finished trials is reported as not tuned yet (no best trial, no steps, not fitted).

    Returns:
        ``{framework: {"targets": [...], "methods": {method: {"cells": {batch: cell},
        "fits": {target: fit or None}, "b_simple": median or None}}}}``; the keys of
        ``cells`` are batch sizes as strings (JSON), targets as :func:`target_key` strings.
    """
    records = _study_records(records)
    out: dict[str, Any] = {}
    frameworks = sorted({r["plan"]["framework"] for r in records}, key=_framework_order)
    for framework in frameworks:
        mine = [r for r in records if r["plan"]["framework"] == framework]
        targets = sorted({float(t) for r in mine for t in r["plan"]["study"]["targets"]})
        methods: dict[str, Any] = {}
        for method in sorted({r["plan"]["method"] for r in mine}, key=_method_order):
            cells = {}
            for batch in sorted({r["plan"]["global_batch"] for r in mine if r["plan"]["method"] == method}):
                cell_runs = [r for r in mine if r["plan"]["method"] == method and r["plan"]["global_batch"] == batch]
                cells[str(batch)] = _cell(cell_runs, batch, targets, trials)
            fits = {}
            for target in targets:
                key = target_key(target)
                points = [(c["batch"], c["steps"][key]["median"]) for c in cells.values()
                          if c["steps"].get(key, {}).get("median") is not None]
                fit = fit_critical_batch([b for b, _ in points], [s for _, s in points]) if points else None
                fits[key] = None if fit is None else fit.to_config()
            noise = [c["b_simple"] for c in cells.values() if c["b_simple"] is not None]
            methods[method] = {"cells": cells, "fits": fits, "b_simple": statistics.median(noise) if noise else None}
        out[framework] = {"targets": [target_key(t) for t in targets], "methods": methods}
    return out


# -- CSV ----------------------------------------------------------------------
def _csv_row(record: Mapping[str, Any]) -> dict[str, Any]:
    plan, result = record["plan"], record["result"]
    schedule = plan["schedule"]
    return {
        "framework": plan["framework"], "method": plan["method"], "global_batch": plan["global_batch"],
        "phase": plan["study"]["phase"], "trial": plan["study"]["trial"], "seed": plan["seed"],
        "per_worker_batch": plan["per_worker_batch"], "workers": plan["world_size"],
        "steps_per_epoch": plan["steps_per_epoch"], "horizon_steps": schedule["total_steps"],
        "optimizer": plan["optimizer"], "base_lr": plan["base_lr"], "scaling": plan["scaling"],
        "lr_multiplier": plan["lr_multiplier"], "peak_lr": schedule["peak"],
        "warmup_steps": schedule["warmup_steps"], "warmup_fraction": plan["warmup_fraction"],
        "schedule": f"{schedule['warmup']} warmup, {schedule['decay']} decay",
        "targets": json.dumps(plan["study"]["targets"]),
        "steps_to_target": json.dumps(result["steps_to_target"], sort_keys=True),
        "stopped": result["stopped"], "steps": result["steps"],
        "best_validation_accuracy": result["best_validation_accuracy"],
        "final_validation_accuracy": result["final_validation_accuracy"],
        "test_accuracy": result["test_accuracy"], "b_simple_at_target": result.get("b_simple_at_target"),
        "skipped_steps": result.get("skipped_steps", 0), "seconds": round(float(result["seconds"]), 2),
        "optimizer_config": json.dumps(plan["optimizer_config"], sort_keys=True),
        "exclusions": json.dumps(plan.get("exclusions") or {}, sort_keys=True),
        "conadv": "" if plan["conadv"] is None else json.dumps(plan["conadv"], sort_keys=True),
        "finished_at": record.get("finished_at", ""),
    }


def write_csv(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """One row per run of the study with the columns of ``CSV_COLUMNS``."""
    rows = sorted(
        _study_records(records),
        key=lambda r: (_framework_order(r["plan"]["framework"]), _method_order(r["plan"]["method"]),
                       r["plan"]["global_batch"], ("tune", "seed", "epochs").index(r["plan"]["study"]["phase"]),
                       r["plan"]["study"]["trial"], r["plan"]["seed"]),
    )
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in rows:
            writer.writerow(_csv_row(record))


# -- Markdown -----------------------------------------------------------------
def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _steps_text(spread: Mapping[str, Any] | None) -> str:
    if not spread or not spread["runs"]:
        return ""
    if spread["median"] is None:
        return f"not reached ({spread['reached']}/{spread['runs']})"
    low, high = spread["min"], spread["max"]
    span = f" [{low:g}-{high:g}]" if low != high else ""
    return f"{spread['median']:g}{span} ({spread['reached']}/{spread['runs']})"


def _cell_steps_text(cell: Mapping[str, Any] | None, key: str) -> str:
    if cell is None:
        return ""
    if not cell["tuned"]:
        return f"(tuning: {len(cell['trials'])} trial(s) done)"
    return _steps_text(cell["steps"].get(key))


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _count(value: float | None) -> str:
    """``1234.5`` -> ``1,234`` (examples, noise scales, critical batches)."""
    return "" if value is None else f"{value:,.0f}"


def format_table(analysis: Mapping[str, Any], commands: Sequence[str] = ()) -> str:
    """The Markdown report of :func:`analyse`'s result."""
    lines = ["# Batch-size study: steps to a target validation accuracy", ""]
    if commands:
        lines += ["Produced by:", "", "```"] + list(commands) + ["```", ""]
    for framework, part in analysis.items():
        methods = part["methods"]
        batches = sorted({int(b) for m in methods.values() for b in m["cells"]})
        for key in part["targets"]:
            lines += [f"## {framework}: steps to {float(key) * 100:g}% validation accuracy", "",
                      "Median over the best tuning trial and its repeats [min-max of those that reached it] "
                      "(runs that reached it / runs).", ""]
            rows = [[method] + [_cell_steps_text(m["cells"].get(str(b)), key) for b in batches]
                    for method, m in methods.items()]
            lines += _markdown_table(["method"] + [f"B={b}" for b in batches], rows) + [""]
            lines += [f"### {framework}: critical batch for {float(key) * 100:g}% (fit of S = S_min (1 + B_crit/B) "
                      "to the medians) and the gradient noise scale", ""]
            rows = []
            for method, m in methods.items():
                fit = m["fits"].get(key)
                if fit is None:
                    rows.append([method, "", "", "", "", "", _count(m["b_simple"])])
                    continue
                rows.append([method, f"{fit['s_min']:.1f}", _count(fit["b_crit"]) or "no bend",
                             _count(fit["e_min"]), str(fit["points"]), f"{fit['r_squared']:.3f}",
                             _count(m["b_simple"])])
            lines += _markdown_table(["method", "S_min", "B_crit", "E_min", "points", "R^2",
                                      "B_simple at target (median)"], rows) + [""]
        lines += [f"## {framework}: examples to {float(part['targets'][0]) * 100:g}% (median steps x batch)", ""]
        key = part["targets"][0]
        rows = [[method] + [_count(m["cells"].get(str(b), {}).get("examples", {}).get(key)) for b in batches]
                for method, m in methods.items()]
        lines += _markdown_table(["method"] + [f"B={b}" for b in batches], rows) + [""]
        epochs = sorted({c["fixed_epochs"]["epochs"] for m in methods.values() for c in m["cells"].values()
                         if c["fixed_epochs"]})
        if epochs:
            lines += [f"## {framework}: test accuracy after a fixed {', '.join(map(str, epochs))} epoch(s) "
                      "(the papers' view; best tuned LR and warmup, seed 0)", ""]
            rows = [[method] + [
                "" if not (c := m["cells"].get(str(b))) or not c["fixed_epochs"]
                else f"{100 * c['fixed_epochs']['test_accuracy']:.2f}%" for b in batches]
                for method, m in methods.items()]
            lines += _markdown_table(["method"] + [f"B={b}" for b in batches], rows) + [""]
        lines += [f"## {framework}: chosen settings (best trial per cell) and every trial", "",
                  "Trial columns: peak LR / horizon steps / warmup steps -> steps to the first target "
                  "(- when not reached; how the trial stopped).", ""]
        rows = []
        for method, m in methods.items():
            for b in batches:
                c = m["cells"].get(str(b))
                if not c or not c["trials"] or not c["tuned"]:
                    continue
                tried = "; ".join(
                    f"{t['peak_lr']:.3g}/{t['horizon']}/{t['warmup_steps']} -> "
                    f"{t['steps_to_target'].get(key) if t['steps_to_target'].get(key) is not None else '-'}"
                    f" ({t['stopped']})"
                    for t in c["trials"]
                )
                best = c["best"]
                rows.append([method, str(b), str(c["best_trial"]), f"{best['peak_lr']:.3g}", str(best["horizon"]),
                             str(best["warmup_steps"]), tried, f"{c['seconds']:.0f}"])
        lines += _markdown_table(["method", "batch", "best trial", "peak LR", "horizon", "warmup", "trials",
                                  "seconds (cell)"], rows) + [""]
    return "\n".join(lines) + "\n"


# -- plots --------------------------------------------------------------------
def write_plot(analysis: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Median steps to the first target against batch, log-log, per framework; perfect scaling dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = list(analysis)
    fig, axes = plt.subplots(1, max(1, len(frameworks)), figsize=(6.5 * max(1, len(frameworks)), 5), squeeze=False)
    for axis, framework in zip(axes[0], frameworks):
        part = analysis[framework]
        key = part["targets"][0]
        anchor: tuple[float, float] | None = None
        for method, m in part["methods"].items():
            points = [(c["batch"], c["steps"][key]) for c in m["cells"].values()
                      if c["steps"].get(key, {}).get("median") is not None]
            if not points:
                continue
            batches = [b for b, _ in points]
            medians = [s["median"] for _, s in points]
            low = [s["median"] - s["min"] for _, s in points]
            high = [s["max"] - s["median"] for _, s in points]
            line = axis.errorbar(batches, medians, yerr=[low, high], marker="o", capsize=3, label=method)
            fit = m["fits"].get(key)
            if fit and fit["b_crit"]:
                grid = [batches[0] * (batches[-1] / batches[0]) ** (i / 40) for i in range(41)]
                axis.plot(grid, [predicted_steps(fit["s_min"], fit["b_crit"], b) for b in grid], ls="--",
                          color=line[0].get_color(), alpha=0.6, lw=1)
            if anchor is None or batches[0] < anchor[0] or (batches[0] == anchor[0] and medians[0] < anchor[1]):
                anchor = (batches[0], medians[0])
        if anchor is not None:
            all_batches = sorted({c["batch"] for m in part["methods"].values() for c in m["cells"].values()})
            axis.plot(all_batches, [anchor[1] * anchor[0] / b for b in all_batches], ls=":", color="black",
                      label="perfect scaling")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("global batch size")
        axis.set_ylabel(f"steps to {float(key) * 100:g}% validation accuracy")
        axis.set_title(f"{framework}: median of 1+seeds runs, min-max bars, fit dashed")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_noise_plot(
    records: Iterable[Mapping[str, Any]], path: str | os.PathLike, trials: int | None = None
) -> None:
    """``B_simple`` against step, one panel per framework and method, one line per batch (best runs, seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    analysis = analyse(records, trials)
    chosen: dict[tuple[str, str], list[tuple[int, list]]] = {}
    for record in _study_records(records):
        plan = record["plan"]
        cell = analysis[plan["framework"]]["methods"][plan["method"]]["cells"][str(plan["global_batch"])]
        if plan["study"]["phase"] == "tune" and plan["study"]["trial"] == cell["best_trial"] and \
                record["result"].get("noise_scale"):
            chosen.setdefault((plan["framework"], plan["method"]), []).append(
                (plan["global_batch"], record["result"]["noise_scale"]))
    panels = sorted(chosen, key=lambda k: (_framework_order(k[0]), _method_order(k[1])))
    columns = min(4, max(1, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    if not panels:
        axes[0][0].set_visible(True)
        axes[0][0].text(0.5, 0.5, "no noise-scale measurements (one worker, or Keras)", ha="center", va="center")
    for axis, (framework, method) in zip(axes.flat, panels):
        for batch, trace in sorted(chosen[(framework, method)]):
            axis.plot([s for s, _ in trace], [b for _, b in trace], label=f"B={batch}")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(f"{framework} {method}", fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylabel("B_simple")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(store: ResultsStore) -> str:
    """Writes every report of ``store``'s directory; returns the Markdown table."""
    out = Path(store.out_dir)
    records = store.records
    trials = (store.settings or {}).get("search", {}).get("trials")
    analysis = analyse(records, trials)
    write_json_atomically(out / SUMMARY_FILE, finite_or_none(analysis))
    write_csv(records, out / CSV_FILE)
    text = format_table(analysis, store.commands)
    (out / TABLE_FILE).write_text(text)
    if analysis:
        write_plot(analysis, out / PLOT_FILE)
        write_noise_plot(records, out / NOISE_PLOT_FILE, trials)
    return text


