"""The files of a batch-size sweep's output directory, and what they mean for resuming.

``hvd-largebatch bench --out DIR`` keeps its state in ``DIR``:

* ``results.json``: the sweep settings, the commands that ran, and one record
  per finished cell (its full :class:`~hvd_largebatch.bench.recipes.CellPlan` and
  its measured result). Rank 0 rewrites it atomically after every cell, so an
  interrupted sweep loses at most the cell that was running; a rerun of the
  same command skips every finished cell whose plan is unchanged.
* ``_run/``: bookkeeping of the current launch: ``job.json`` (what the
  workers run), ``running.json`` (the cell in progress, written by rank 0 at
  its start) and ``failure-rank<r>.json`` (written by a rank whose cell raised).
  The launcher reads them to name the failed cell.
* ``sweep.log``: everything every rank and ``horovodrun`` printed.

The reports (``results.csv``, ``table.md``, ``accuracy_vs_batch.png``) are
written from ``results.json`` by :mod:`hvd_largebatch.bench.report`.

Standard library only.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hvd_largebatch.bench.atomic_file import write_json_atomically
from hvd_largebatch.bench.recipes import CellPlan

__all__ = [
    "RESULTS_FORMAT",
    "RESULTS_FILE",
    "RUN_DIRECTORY",
    "ResultsStore",
    "FailureMarkers",
    "finite_or_none",
]

RESULTS_FORMAT = 1
RESULTS_FILE = "results.json"
RUN_DIRECTORY = "_run"


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/Inf float replaced by None (results.json and summary.json stay strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} here" for k in keys if stored.get(k) != wanted.get(k)]


class ResultsStore:
    """``DIR/results.json``: the finished cells of one sweep, and the settings they share.

    Args:
        out_dir: the sweep's output directory (created on first write).

    Raises:
        ValueError: when ``results.json`` exists but is not a results file of
            this format (naming the file).
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS_FILE
        self._data: dict[str, Any] = {"format": RESULTS_FORMAT, "settings": None, "commands": [], "cells": []}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"--out {self.out_dir}: {self.path} is not readable JSON ({err})") from None
            if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT or "cells" not in data:
                raise ValueError(f"--out {self.out_dir}: {self.path} is not a results file of format {RESULTS_FORMAT}")
            self._data = data

    # -- settings -----------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any] | None:
        return self._data["settings"]

    def adopt_settings(self, settings: Mapping[str, Any]) -> None:
        """Checks that ``settings`` match the stored ones (or stores them in a new sweep).

        Raises:
            ValueError: naming ``--out`` and every differing setting; finished
                cells are only comparable under the same settings.
        """
        settings = json.loads(json.dumps(dict(settings)))  # normalise tuples to lists
        stored = self._data["settings"]
        if stored is None:
            self._data["settings"] = settings
            return
        if stored != settings:
            raise ValueError(
                f"--out {self.out_dir} holds a sweep with other settings ({'; '.join(_differences(stored, settings))}); "
                "use another --out directory, or delete its results.json to start over"
            )

    def add_command(self, command: str) -> None:
        if command not in self._data["commands"]:
            self._data["commands"].append(command)

    @property
    def commands(self) -> list[str]:
        return list(self._data["commands"])

    # -- cells ----------------------------------------------------------------
    @property
    def records(self) -> list[dict[str, Any]]:
        """Every finished cell's record ``{"key", "plan", "result", "finished_at"}``, in finishing order."""
        return list(self._data["cells"])

    def record_for(self, key: str) -> dict[str, Any] | None:
        for record in self._data["cells"]:
            if record["key"] == key:
                return record
        return None

    def is_finished(self, plan: CellPlan) -> bool:
        """True when a cell with ``plan``'s key finished under exactly this plan."""
        record = self.record_for(plan.key)
        return record is not None and record["plan"] == json.loads(json.dumps(plan.to_config()))

    def split(self, plans: Iterable[CellPlan]) -> tuple[list[CellPlan], list[CellPlan], list[CellPlan]]:
        """``(finished, pending, changed)``: ``changed`` are pending cells whose stored plan differs."""
        finished, pending, changed = [], [], []
        for plan in plans:
            if self.is_finished(plan):
                finished.append(plan)
            else:
                pending.append(plan)
                if self.record_for(plan.key) is not None:
                    changed.append(plan)
        return finished, pending, changed

    def add(self, plan: CellPlan, result: Mapping[str, Any]) -> None:
        """Stores a finished cell (replacing an older record of the same key) and saves the file."""
        record = {
            "key": plan.key,
            "plan": json.loads(json.dumps(plan.to_config())),
            "result": finite_or_none(json.loads(json.dumps(dict(result)))),
            "finished_at": _now(),
        }
        self._data["cells"] = [r for r in self._data["cells"] if r["key"] != plan.key] + [record]
        self.save()

    def merge(self, other: ResultsStore) -> int:
        """Adds ``other``'s finished runs and commands (a study of the same settings); returns how many runs.

        A run already stored here under the same key is kept as it is.

        Raises:
            ValueError: naming ``--merge`` when the settings differ or ``other`` holds no settings.
        """
        if other.settings is None or other.settings != self.settings:
            raise ValueError(
                f"--merge {other.out_dir}: its study has other settings than {self.out_dir}; "
                "only runs of the same settings can be reported together"
            )
        known = {r["key"] for r in self._data["cells"]}
        added = [r for r in other.records if r["key"] not in known]
        self._data["cells"] += added
        for command in other.commands:
            self.add_command(command)
        return len(added)

    def save(self) -> None:
        write_json_atomically(self.path, self._data)


class FailureMarkers:
    """``DIR/_run``: which cell is running, and which rank's cell failed and why.

    Every rank whose cell raises writes ``failure-rank<r>.json``. When one rank
    fails, Horovod shuts down and the other ranks fail too, with
    ``HorovodInternalError``; :meth:`first_cause` therefore prefers a marker
    whose error is not Horovod's shutdown.
    """

    _SHUTDOWN_ERRORS = ("HorovodInternalError",)

    def __init__(self, out_dir: str | os.PathLike):
        self.directory = Path(out_dir) / RUN_DIRECTORY

    def clear(self) -> None:
        """Removes the markers of a previous launch (the job file is kept)."""
        if self.directory.is_dir():
            for path in self.directory.glob("failure-rank*.json"):
                path.unlink()
            running = self.directory / "running.json"
            if running.exists():
                running.unlink()

    def mark_running(self, plan: CellPlan, index: int, total: int) -> None:
        write_json_atomically(self.directory / "running.json", {"key": plan.key, "label": plan.label,
                                                                 "index": index, "total": total, "started_at": _now()})

    def mark_idle(self) -> None:
        running = self.directory / "running.json"
        if running.exists():
            running.unlink()

    def running(self) -> dict[str, Any] | None:
        return self._read(self.directory / "running.json")

    def mark_failed(self, rank: int, plan: CellPlan | None, error: BaseException, traceback_text: str) -> None:
        write_json_atomically(
            self.directory / f"failure-rank{rank}.json",
            {
                "rank": rank,
                "key": None if plan is None else plan.key,
                "label": "setting up the workers" if plan is None else plan.label,
                "error_type": type(error).__name__,
                "error": str(error),
                "traceback": traceback_text,
                "at": _now(),
            },
        )

    def failures(self) -> list[dict[str, Any]]:
        if not self.directory.is_dir():
            return []
        found = [self._read(path) for path in sorted(self.directory.glob("failure-rank*.json"))]
        return [f for f in found if f is not None]

    def first_cause(self) -> dict[str, Any] | None:
        """The failure that most likely started it: not a Horovod shutdown, lowest rank first."""
        failures = sorted(self.failures(), key=lambda f: f.get("rank", 0))
        for failure in failures:
            if failure.get("error_type") not in self._SHUTDOWN_ERRORS and "Horovod has been shut down" not in str(
                failure.get("error", "")
            ):
                return failure
        return failures[0] if failures else None

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
