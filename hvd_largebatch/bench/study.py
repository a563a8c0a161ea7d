"""The batch-size study: what is run, in which order, and which trial wins (the plan, framework-free).

``hvd-largebatch bench`` measures, for each method and global batch size, the
steps to reach a target validation accuracy fixed before the runs, the way
Shallue et al. 2019, McCandlish et al. 2018 and Nado et al. 2021 measure it:

1. **tune**: every (method, batch) cell runs the same number of trials
   (:class:`~hvd_largebatch.bench.tuning.SearchSpace`), a quasi-random search
   over the peak LR (around the method's base LR scaled to the batch), the
   decay horizon (around :func:`horizon_guess`) and, for methods that warm
   up, the warmup length. A trial stops as soon as it reaches the highest
   target, diverges, or exhausts its horizon (its step budget); seed 0.
2. **seed**: the best trial's setting (:func:`~hvd_largebatch.bench.tuning.best_trial`
   on the first target) is run again with seeds ``1..seeds``; the table
   reports the median and spread of the steps to target over the best trial
   and these repeats.
3. **epochs**: the papers' view: the best setting trained for a fixed number
   of epochs (the horizon is then ``epochs`` epochs), final test accuracy.

Every run is a :class:`~hvd_largebatch.bench.recipes.CellPlan` whose ``study``
field says what the runner measures: the evaluation steps
(:func:`~hvd_largebatch.bench.targets.evaluation_steps` of its horizon), the
targets, whether it stops at the target, and the validation split (the last
``validation_size`` examples of the generated training set; the test split
is only used for the fixed-epoch accuracy).

:func:`next_run` is the whole scheduler: given the finished runs it returns
the first run still to do, cell by cell (a cell's repeats as soon as its
tuning is complete), so one ``horovodrun`` launch runs the study with rank 0
deciding and broadcasting each run, and a rerun of the same command resumes
where it stopped and chooses the same best trials.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from hvd_largebatch.bench.data import MNIST1DSpec
from hvd_largebatch.bench.recipes import BASE_BATCH, METHOD_NAMES, CellPlan, plan_cell, recipe_for
from hvd_largebatch.bench.run_monitor import target_key
from hvd_largebatch.bench.targets import DEFAULT_EVALUATION_RATIO, check_target
from hvd_largebatch.bench.tuning import SearchSpace, TrialSetting, best_trial, trial_settings
from hvd_largebatch.config import check_choice, check_positive, check_positive_int

__all__ = [
    "PHASES",
    "DEFAULT_TARGETS",
    "DEFAULT_VALIDATION_SIZE",
    "DEFAULT_HORIZON",
    "StudySettings",
    "horizon_guess",
    "tuning_runs",
    "repeat_runs",
    "fixed_epoch_run",
    "runs_per_cell",
    "next_run",
    "cell_records",
    "best_tuning_record",
]

PHASES = ("tune", "seed", "epochs")
#: 95% validation accuracy: chosen before the study from the first probe (LARS, 2.5e5..1e6 examples per run),
#: which put the critical batch for it near 600, between the grid's 256 and 1024.
DEFAULT_TARGETS = (0.95,)
DEFAULT_VALIDATION_SIZE = 4000
#: ``(S0, B0)`` of the horizon guess ``S0 * (1 + B0 / B)`` steps: about 1.5 times the steps the first
#: probe needed for 95% (LARS: 208 at batch 256, 73 at 4096).
DEFAULT_HORIZON = (100.0, 500.0)


def _check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What every run of a study shares; a resumed study must have the same settings.

    Attributes:
        targets: validation accuracies in (0, 1), fixed before the runs, ascending; the
            first is the one the tuning optimises, a run stops at the last.
        search: the per-cell tuning budget and search space.
        seeds: repeats of each cell's best setting with seeds 1..seeds (0: none).
        epochs: epochs of the fixed-epoch view (0: no such runs).
        workers: Horovod processes.
        data: the MNIST-1D spec; its training split is split again into training and validation.
        validation_size: examples at the end of the generated training split held out for the targets.
        base_batch: the batch the base LRs refer to.
        base_lrs: ``(method, lr)`` overrides of the recipes' base LRs.
        horizon: ``(S0, B0)``: the horizon guess at batch ``B`` is ``S0 * (1 + B0 / B)`` steps.
        evaluation_ratio: growth factor of the evaluation steps.
    """

    targets: tuple[float, ...] = DEFAULT_TARGETS
    search: SearchSpace = dataclasses.field(default_factory=SearchSpace)
    seeds: int = 2
    epochs: int = 2
    workers: int = 2
    data: MNIST1DSpec = dataclasses.field(default_factory=MNIST1DSpec)
    validation_size: int = DEFAULT_VALIDATION_SIZE
    base_batch: int = BASE_BATCH
    base_lrs: tuple[tuple[str, float], ...] = ()
    horizon: tuple[float, float] = DEFAULT_HORIZON
    evaluation_ratio: float = DEFAULT_EVALUATION_RATIO

    def __post_init__(self) -> None:
        targets = tuple(check_target("targets", t) for t in self.targets)
        if not targets or list(targets) != sorted(set(targets)):
            raise ValueError(f"targets must be a non-empty ascending list without repeats, got {list(self.targets)!r}")
        object.__setattr__(self, "targets", targets)
        if not isinstance(self.search, SearchSpace):
            raise ValueError(f"search must be a SearchSpace, got {self.search!r}")
        _check_non_negative_int("seeds", self.seeds)
        _check_non_negative_int("epochs", self.epochs)
        check_positive_int("workers", self.workers)
        check_positive_int("validation_size", self.validation_size)
        if self.validation_size >= self.data.train_size:
            raise ValueError(
                f"validation_size must be smaller than the generated training split ({self.data.train_size}), "
                f"got {self.validation_size}"
            )
        check_positive_int("base_batch", self.base_batch)
        overrides = dict(self.base_lrs)
        for method, lr in overrides.items():
            check_choice("base_lrs method", method, METHOD_NAMES)
            overrides[method] = check_positive(f"base LR of {method}", lr)
        object.__setattr__(self, "base_lrs", tuple(sorted(overrides.items())))
        if len(self.horizon) != 2:
            raise ValueError(f"horizon must be two numbers (S0, B0), got {self.horizon!r}")
        object.__setattr__(
            self, "horizon", (check_positive("horizon S0", self.horizon[0]), float(self.horizon[1]))
        )
        if self.horizon[1] < 0 or not math.isfinite(self.horizon[1]):
            raise ValueError(f"horizon B0 must be a finite number >= 0, got {self.horizon[1]!r}")
        if not self.evaluation_ratio > 1.0:
            raise ValueError(f"evaluation_ratio must be > 1, got {self.evaluation_ratio!r}")

    @property
    def train_size(self) -> int:
        """Training examples after the validation split is held out."""
        return self.data.train_size - self.validation_size

    def to_config(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "search": self.search.to_config(),
            "seeds": self.seeds,
            "epochs": self.epochs,
            "workers": self.workers,
            "data": self.data.to_config(),
            "validation_size": self.validation_size,
            "base_batch": self.base_batch,
            "base_lrs": dict(self.base_lrs),
            "horizon": list(self.horizon),
            "evaluation_ratio": self.evaluation_ratio,
        }

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> StudySettings:
        values = dict(values)
        values["targets"] = tuple(values["targets"])
        values["search"] = SearchSpace.from_config(values["search"])
        values["data"] = MNIST1DSpec.from_config(values["data"])
        values["base_lrs"] = tuple(sorted(dict(values["base_lrs"]).items()))
        values["horizon"] = tuple(values["horizon"])
        return cls(**values)


def horizon_guess(settings: StudySettings, global_batch: int) -> float:
    """The centre of the horizon search at ``global_batch``: ``S0 * (1 + B0 / B)`` steps."""
    s0, b0 = settings.horizon
    return s0 * (1.0 + b0 / global_batch)


def _study_fields(settings: StudySettings, phase: str, trial: int, stop_at_target: bool) -> dict[str, Any]:
    return {
        "phase": phase,
        "trial": trial,
        "targets": list(settings.targets),
        "stop_at_target": stop_at_target,
        "evaluation_ratio": settings.evaluation_ratio,
        "validation_size": settings.validation_size,
    }


def _check_cell(settings: StudySettings, method: str, global_batch: int) -> None:
    check_choice("methods", method, METHOD_NAMES)
    check_positive_int("batch_sizes", global_batch)
    if global_batch % settings.workers:
        raise ValueError(
            f"batch_sizes must be multiples of workers={settings.workers} (each worker takes an equal share of "
            f"the global batch); got {global_batch}"
        )
    if global_batch > settings.train_size:
        raise ValueError(
            f"batch_sizes must be at most the training examples left after the validation split "
            f"({settings.train_size}); got {global_batch}"
        )


def _plan(
    framework: str, method: str, global_batch: int, settings: StudySettings, setting: TrialSetting, *,
    phase: str, seed: int, total_steps: int, stop_at_target: bool,
) -> CellPlan:
    recipe = recipe_for(method, dict(settings.base_lrs).get(method))
    return plan_cell(
        recipe, framework=framework, global_batch=global_batch, world_size=settings.workers,
        train_size=settings.train_size, seed=seed, total_steps=total_steps, base_batch=settings.base_batch,
        lr_multiplier=setting.lr_multiplier, warmup_fraction=setting.warmup_fraction,
        study=_study_fields(settings, phase, setting.index, stop_at_target),
    )


def tuning_runs(framework: str, method: str, global_batch: int, settings: StudySettings) -> list[CellPlan]:
    """The cell's tuning trials (seed 0), in trial order.

    Raises:
        ValueError: naming ``methods`` or ``batch_sizes`` for a cell the settings cannot run.
    """
    _check_cell(settings, method, global_batch)
    guess = horizon_guess(settings, global_batch)
    return [
        _plan(framework, method, global_batch, settings, setting, phase="tune", seed=0,
              total_steps=max(1, int(round(guess * setting.horizon_multiplier))), stop_at_target=True)
        for setting in trial_settings(settings.search, warmup=recipe_for(method).warmup)
    ]


def _setting_of(plan_config: Mapping[str, Any]) -> TrialSetting:
    return TrialSetting(
        index=int(plan_config["study"]["trial"]),
        lr_multiplier=float(plan_config["lr_multiplier"]),
        horizon_multiplier=1.0,
        warmup_fraction=float(plan_config["warmup_fraction"]),
    )


def repeat_runs(
    framework: str, method: str, global_batch: int, settings: StudySettings, best: Mapping[str, Any]
) -> list[CellPlan]:
    """The best tuning trial (``best``: its stored plan) again with seeds ``1..settings.seeds``."""
    total = int(best["schedule"]["total_steps"])
    return [
        _plan(framework, method, global_batch, settings, _setting_of(best), phase="seed", seed=seed,
              total_steps=total, stop_at_target=True)
        for seed in range(1, settings.seeds + 1)
    ]


def fixed_epoch_run(
    framework: str, method: str, global_batch: int, settings: StudySettings, best: Mapping[str, Any]
) -> CellPlan:
    """The best trial's LR and warmup fraction trained for ``settings.epochs`` epochs (seed 0, no early stop)."""
    steps_per_epoch = settings.train_size // global_batch
    return _plan(framework, method, global_batch, settings, _setting_of(best), phase="epochs", seed=0,
                 total_steps=settings.epochs * steps_per_epoch, stop_at_target=False)


def runs_per_cell(settings: StudySettings) -> int:
    """Runs in one (method, batch) cell: trials, repeats and the fixed-epoch run."""
    return settings.search.trials + settings.seeds + (1 if settings.epochs else 0)


def cell_records(
    records: Sequence[Mapping[str, Any]], framework: str, method: str, global_batch: int, phase: str
) -> list[Mapping[str, Any]]:
    """The finished runs of one cell and phase, by trial then seed."""
    found = [
        r for r in records
        if r["plan"]["framework"] == framework and r["plan"]["method"] == method
        and r["plan"]["global_batch"] == global_batch and (r["plan"].get("study") or {}).get("phase") == phase
    ]
    return sorted(found, key=lambda r: (r["plan"]["study"]["trial"], r["plan"]["seed"]))


def _target_result(record: Mapping[str, Any], target: float) -> dict[str, Any]:
    result = record["result"]
    return {
        "steps_to_target": result["steps_to_target"].get(target_key(target)),
        "best_accuracy": result.get("best_validation_accuracy"),
    }


def best_tuning_record(tuned: Sequence[Mapping[str, Any]], target: float) -> Mapping[str, Any]:
    """The record of the best trial for ``target`` among a cell's finished tuning runs."""
    return tuned[best_trial([_target_result(r, target) for r in tuned])]


def next_run(
    framework: str,
    methods: Sequence[str],
    batch_sizes: Sequence[int],
    settings: StudySettings,
    records: Sequence[Mapping[str, Any]],
) -> CellPlan | None:
    """The first run still to do (None when the study is complete).

    Cells go method by method, batch sizes ascending; inside a cell: the
    trials, then (once all trials are finished) the repeats of the best one,
    then the fixed-epoch run. A finished run is one whose stored plan equals
    the planned one.
    """
    done = {r["key"]: r["plan"] for r in records}

    def pending(plan: CellPlan) -> bool:
        return done.get(plan.key) != _normalised(plan)

    for method in methods:
        for batch in sorted(batch_sizes):
            trials = tuning_runs(framework, method, batch, settings)
            for plan in trials:
                if pending(plan):
                    return plan
            tuned = cell_records(records, framework, method, batch, "tune")
            tuned = [r for r in tuned if r["key"] in {p.key for p in trials}]
            best = best_tuning_record(tuned, settings.targets[0])["plan"]
            followers = repeat_runs(framework, method, batch, settings, best)
            if settings.epochs:
                followers.append(fixed_epoch_run(framework, method, batch, settings, best))
            for plan in followers:
                if pending(plan):
                    return plan
    return None


def _normalised(plan: CellPlan) -> dict[str, Any]:
    return json.loads(json.dumps(plan.to_config()))
