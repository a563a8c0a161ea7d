"""The training recipes compared by the batch-size study, with every hyperparameter written down.

Each method of ``hvd-largebatch bench`` trains the same model on the same data
for the same number of epochs; only the recipe changes. A :class:`Recipe`
says which optimizer (by its ``create_optimizer`` name, with all arguments in
the core spelling of :mod:`hvd_largebatch.config`), the base LR and how it
scales with the global batch, and the schedule. :func:`plan_cell` turns a
recipe and a global batch into a :class:`CellPlan`: the fully resolved,
JSON-able description of one training run (optimizer record with defaults
filled in, the core :class:`~hvd_largebatch.schedules.Schedule`, ConAdv
settings) that a framework runner executes and the reports print.

The methods (``METHODS``):

=========  ===============  ===========  ==============================================
method     optimizer        LR scaling   schedule
=========  ===============  ===========  ==============================================
sgd        momentum SGD     linear       no warmup, step decay x0.1 at 1/3, 2/3, 8/9
goyal      momentum SGD     linear       gradual warmup (Goyal), same step decay
nesterov   Nesterov SGD     linear       gradual warmup, poly(2) decay to 0
adam       AdamW            sqrt         gradual warmup, poly(2) decay to 0
lars       LARS             sqrt         gradual warmup, poly(2) decay to 0
clars      CLARS (exact)    sqrt         no warmup, poly(2) decay to 0; trust x16
lamb       LAMB             sqrt         gradual warmup, poly(2) decay to 0
conadv     ConAdv + LARS    sqrt         as lars (mean of clean and adversarial loss)
=========  ===============  ===========  ==============================================

The batch-size study (:mod:`hvd_largebatch.bench.study`) tunes, per method and
batch, the peak LR (as a multiple of the scaled base LR), the decay horizon
(the schedule's total steps) and, for the methods that warm up, the warmup
length (a fraction of the horizon); :func:`plan_cell` takes those three.
``nesterov`` and ``adam`` are the baselines of Nado et al. 2021 ("A Large
Batch Optimizer Reality Check"): well-tuned Nesterov momentum and Adam with
the same warmup and decay as LARS and LAMB. ``adam`` is the package's LAMB
with layer adaptation switched off for every tensor
(``exclude_from_layer_adaptation="."``, a regex every
tensor path matches), i.e. AdamW with the decay added to
the Adam direction: ``w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)``.

Notes on the choices (where the papers leave room):

* ``sgd`` keeps Goyal's step decay and differs from ``goyal`` only by the
  warmup, so the pair measures what the warmup buys (Goyal et al. 2017,
  Table 2's "no warmup" row uses the same decay).
* Short runs cannot use Goyal's 5-of-90 epochs literally; the warmup is a
  fixed fraction of training (``WARMUP_FRACTION``) and the step milestones are
  Goyal's 30/60/80-of-90 as fractions of the run.
* The SGD recipes use Goyal's linear scaling rule, the rule under test. The
  layer-wise adaptive methods (LARS, CLARS, ConAdv, LAMB) use the square-root
  rule, as You et al. 2019 do for LAMB: their trust ratio already sets each
  layer's step relative to its weight norm, so the global LR only scales that
  relative step, and the linear rule would take LARS from its best LR at batch
  128 (8) to 512 at batch 8192, 16 times the LR (32) that already diverges at
  batch 128.
* Base LRs were fixed once from 5-epoch runs at the base batch (128),
  the best test accuracy of a small grid per optimizer; CLARS and ConAdv
  reuse LARS's, Nesterov SGD's. In the study they are only the centre of
  each cell's LR search (scaled to the batch by the method's rule). The
  grid and its results are in ``BASE_LR_SEARCH``. Adam's 0.002 is the
  usual AdamW LR for a batch of about a hundred; it was not searched.
* CLARS divides by the mean per-example gradient norm, which is ``r`` times
  the averaged gradient's norm that LARS divides by (``r`` 8-20 on the bench
  CNN along a LARS run at batch 1024, ``benchmarks/clars_lr_ratio.py``), so
  at LARS's trust coefficient its adapted steps are ``r`` times smaller.
  Its trust coefficient is LARS's times ``CLARS_TRUST_FACTOR`` (16, the best
  of 1, 4, 16 in ``benchmarks/clars_trust_sweep.py`` at batch 1024; raising
  the LR instead diverged). The first study ran CLARS at LARS's trust
  coefficient and reached the target in no cell.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from hvd_largebatch import config, schedules
from hvd_largebatch.config import check_choice, check_positive, check_positive_int

__all__ = [
    "BASE_BATCH",
    "WARMUP_FRACTION",
    "STEP_MILESTONE_FRACTIONS",
    "STEP_GAMMA",
    "POLY_POWER",
    "BASE_LR_SEARCH",
    "BASE_LRS",
    "Recipe",
    "METHODS",
    "METHOD_NAMES",
    "CellPlan",
    "plan_cell",
    "recipe_for",
]

#: The batch at which every base LR was chosen; the sweep's smallest batch.
BASE_BATCH = 128
#: Warmup length as a fraction of training, for the recipes that warm up.
WARMUP_FRACTION = 0.1
#: Goyal's milestones (epochs 30, 60, 80 of 90) as fractions of the run.
STEP_MILESTONE_FRACTIONS = (1 / 3, 2 / 3, 8 / 9)
#: Goyal's step-decay factor.
STEP_GAMMA = 0.1
#: The LARS paper's polynomial decay exponent.
POLY_POWER = 2.0
#: The small-batch runs that fixed the base LRs: PyTorch, batch 128, 5 epochs,
#: 2 workers, the sweep's data and seed (``hvd-largebatch bench --methods M
#: --batch-sizes 128 --epochs 5 --base-lr M=LR``); test accuracy in percent.
#: sgd's runs hold for goyal (at the base batch the two recipes coincide).
BASE_LR_SEARCH: dict[str, dict[float, float]] = {
    "sgd": {0.05: 99.13, 0.1: 99.24, 0.2: 99.14, 0.4: 98.33},
    "lars": {0.5: 97.70, 1.0: 98.62, 2.0: 98.96, 4.0: 99.03, 8.0: 99.33, 16.0: 98.52, 32.0: 46.13},
    "lamb": {0.002: 97.89, 0.005: 99.07, 0.01: 99.28, 0.02: 99.30, 0.04: 99.16},
}
#: Base LR of each method at ``BASE_BATCH``: the best of ``BASE_LR_SEARCH``.
BASE_LRS: dict[str, float] = {
    "sgd": 0.1,
    "goyal": 0.1,
    "nesterov": 0.1,
    "adam": 0.002,
    "lars": 8.0,
    "clars": 8.0,
    "lamb": 0.02,
    "conadv": 8.0,
}

_SGD_ARGS = {"momentum": 0.9, "weight_decay": 5e-4}
_LARS_ARGS = {"momentum": 0.9, "weight_decay": 5e-4, "trust_coefficient": 0.001}
#: CLARS's trust coefficient as a multiple of LARS's (see the notes above).
CLARS_TRUST_FACTOR = 16
_CLARS_ARGS = {
    **_LARS_ARGS,
    "trust_coefficient": CLARS_TRUST_FACTOR * _LARS_ARGS["trust_coefficient"],
    "estimator": "exact",
}
_LAMB_ARGS = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01}

_SCHEDULE_KINDS = ("step", "poly")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One method of the study.

    Attributes:
        method: the method's name in tables and on the command line.
        summary: one line for the reports.
        optimizer: a ``create_optimizer`` name (``sgd``, ``lars``, ``clars``, ``lamb``).
        optimizer_args: the optimizer's arguments in core spelling, except ``lr``
            (which comes from the schedule); unspecified ones keep their
            :mod:`hvd_largebatch.config` defaults, which :func:`plan_cell` writes out.
        base_lr: LR at ``BASE_BATCH``.
        scaling: ``"linear"`` or ``"sqrt"`` (:func:`hvd_largebatch.schedules.scale_lr`).
        warmup: Goyal's gradual warmup from ``base_lr`` over ``WARMUP_FRACTION`` of training.
        decay: ``"step"`` (Goyal) or ``"poly"`` (LARS paper, power 2, to 0).
        conadv: ConAdv arguments (core spelling of ``ConAdvConfig``) or None for clean training.
        exclusions: ``create_optimizer`` exclusion arguments (``exclude_from_layer_adaptation``,
            ``exclude_from_weight_decay``) as ``(name, value)`` pairs; JSON-able values only.
    """

    method: str
    summary: str
    optimizer: str
    optimizer_args: tuple[tuple[str, Any], ...]
    base_lr: float
    scaling: str
    warmup: bool
    decay: str
    conadv: tuple[tuple[str, Any], ...] | None = None
    exclusions: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, config.OPTIMIZER_NAMES)
        object.__setattr__(self, "base_lr", check_positive("base_lr", self.base_lr))
        check_choice("scaling", self.scaling, ("linear", "sqrt"))
        check_choice("decay", self.decay, _SCHEDULE_KINDS)
        config.optimizer_config(self.optimizer, **dict(self.optimizer_args))  # validates the arguments
        for name, _ in self.exclusions:
            check_choice("exclusions", name, ("exclude_from_layer_adaptation", "exclude_from_weight_decay"))
        if self.conadv is not None:
            config.ConAdvConfig(**dict(self.conadv))

    def with_base_lr(self, base_lr: float) -> Recipe:
        """A copy with another base LR (``hvd-largebatch bench --base-lr METHOD=LR``)."""
        return dataclasses.replace(self, base_lr=base_lr)


def _recipe(method: str, summary: str, optimizer: str, args: Mapping[str, Any], **kw: Any) -> Recipe:
    conadv = kw.pop("conadv", None)
    exclusions = kw.pop("exclusions", {})
    return Recipe(
        method=method,
        summary=summary,
        optimizer=optimizer,
        optimizer_args=tuple(sorted(args.items())),
        base_lr=BASE_LRS[method],
        conadv=None if conadv is None else tuple(sorted(conadv.items())),
        exclusions=tuple(sorted(exclusions.items())),
        **kw,
    )


#: ConAdv settings for MNIST-1D. The official code's radius is 9/255 on [0, 1]
#: images; the signals here are standardised (std 1, values roughly in [-5, 5])
#: and unbounded, so there is no clipping to an input range. epsilon = step
#: size = 0.1 and the weighted *mean* of the clean and adversarial losses
#: (``average_losses``) follow the ConAdv implementation's docstring: with the
#: plain sum (the default of docs/algorithms.md) LARS steps the tensors it does not adapt
#: (BatchNorm, biases) twice as far as in clean training, which cost ConAdv +
#: LARS 20-30 points on MNIST-1D there; the mean with epsilon 0.1 matched LARS.
CONADV_ARGS: dict[str, Any] = {
    "epsilon": 0.1,
    "step_size": 0.1,
    "staleness": 1,
    "attack_iters": 1,
    "random_start_prob": 0.8,
    "targeted": True,
    "adv_weight": 1.0,
    "dual_bn": True,
    "input_range": None,
    "average_losses": True,
}

METHODS: dict[str, Recipe] = {
    recipe.method: recipe
    for recipe in (
        _recipe("sgd", "momentum SGD, linear LR scaling, no warmup, step decay", "sgd", _SGD_ARGS,
                scaling="linear", warmup=False, decay="step"),
        _recipe("goyal", "momentum SGD, linear scaling, gradual warmup, step decay (Goyal et al. 2017)", "sgd",
                _SGD_ARGS, scaling="linear", warmup=True, decay="step"),
        _recipe("nesterov", "Nesterov momentum SGD, linear scaling, gradual warmup, poly(2) (Nado et al. 2021)",
                "sgd", {**_SGD_ARGS, "nesterov": True}, scaling="linear", warmup=True, decay="poly"),
        _recipe("adam", "AdamW (LAMB without layer adaptation), sqrt scaling, gradual warmup, poly(2) (Nado et al. 2021)",
                "lamb", _LAMB_ARGS, scaling="sqrt", warmup=True, decay="poly",
                exclusions={"exclude_from_layer_adaptation": "."}),
        _recipe("lars", "LARS, sqrt scaling, gradual warmup, poly(2) decay (You et al. 2017)", "lars", _LARS_ARGS,
                scaling="sqrt", warmup=True, decay="poly"),
        _recipe("clars", "CLARS (exact per-example norms, trust coefficient 16x LARS's), sqrt scaling, no warmup, "
                "poly(2) (Huo et al. 2021)", "clars", _CLARS_ARGS, scaling="sqrt", warmup=False, decay="poly"),
        _recipe("lamb", "LAMB, sqrt scaling, gradual warmup, poly(2) decay (You et al. 2019)", "lamb", _LAMB_ARGS,
                scaling="sqrt", warmup=True, decay="poly"),
        _recipe("conadv", "ConAdv + LARS, as lars plus stale-weight adversarial examples (Liu et al. 2022)", "lars",
                _LARS_ARGS, scaling="sqrt", warmup=True, decay="poly", conadv=CONADV_ARGS),
    )
}
METHOD_NAMES = tuple(METHODS)


def recipe_for(method: str, base_lr: float | None = None) -> Recipe:
    """The recipe of ``method`` (one of ``METHOD_NAMES``), optionally with another base LR.

    Raises:
        ValueError: naming ``method`` and the allowed names, or a bad ``base_lr``.
    """
    check_choice("method", method, METHOD_NAMES)
    recipe = METHODS[method]
    return recipe if base_lr is None else recipe.with_base_lr(base_lr)


@dataclasses.dataclass(frozen=True)
class CellPlan:
    """One resolved training run of the study: everything a runner needs and a report prints.

    Attributes:
        framework: ``"torch"`` or ``"keras"``.
        method: the recipe's name.
        global_batch: examples per update over all workers.
        world_size: Horovod processes.
        per_worker_batch: ``global_batch / world_size``.
        epochs: passes over the training set.
        steps_per_epoch: updates per epoch (the last partial batch is dropped).
        optimizer: ``create_optimizer`` name.
        optimizer_config: the validated optimizer record, every field (core
            spelling), with ``lr`` the schedule's LR at step 0.
        schedule: the per-step LR.
        base_lr: LR at ``base_batch``; ``scaling``: the rule that scaled it.
        base_batch: the batch of ``base_lr``.
        conadv: the validated ConAdv record's fields, or None.
        seed: seed of the model initialisation and of the data order.
        summary: the recipe's one-line description.
        lr_multiplier: the peak LR as a multiple of the scaled base LR (1 outside a tuning search).
        warmup_fraction: warmup steps as a fraction of the schedule's total steps (0 without warmup).
        exclusions: the recipe's ``create_optimizer`` exclusion arguments.
        study: for a run of the batch-size study, what the runner measures and when it stops
            (``phase``, ``trial``, ``targets``, ``stop_at_target``, ``eval_steps``,
            ``validation_size``, ``noise_scale``; see :mod:`hvd_largebatch.study`), else None.
    """

    framework: str
    method: str
    global_batch: int
    world_size: int
    per_worker_batch: int
    epochs: int
    steps_per_epoch: int
    optimizer: str
    optimizer_config: dict[str, Any]
    schedule: schedules.Schedule
    base_lr: float
    scaling: str
    base_batch: int
    conadv: dict[str, Any] | None
    seed: int
    summary: str
    lr_multiplier: float = 1.0
    warmup_fraction: float = 0.0
    exclusions: dict[str, Any] = dataclasses.field(default_factory=dict)
    study: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        """The run's identity in results.json: ``framework:method:global_batch``, plus
        ``:phase:trial:seed`` for a run of the study."""
        return self._identity(":", batch="", seed="")

    @property
    def label(self) -> str:
        """The key for people: ``framework method batch B``, plus ``phase trial seed S``."""
        return self._identity(" ", batch="batch ", seed="seed ")

    def _identity(self, separator: str, batch: str, seed: str) -> str:
        parts = [self.framework, self.method, f"{batch}{self.global_batch}"]
        if self.study is not None:
            parts += [str(self.study["phase"]), str(self.study["trial"]), f"{seed}{self.seed}"]
        return separator.join(parts)

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def optimizer_args(self) -> dict[str, Any]:
        """The optimizer record without ``lr`` (the runner sets the LR from the schedule)."""
        return {k: v for k, v in self.optimizer_config.items() if k != "lr"}

    def to_config(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["schedule"] = self.schedule.to_config()
        if self.conadv is not None and self.conadv.get("input_range") is not None:
            values["conadv"] = {**self.conadv, "input_range": list(self.conadv["input_range"])}
        return values

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> CellPlan:
        values = dict(values)
        values["schedule"] = schedules.Schedule.from_config(values["schedule"])
        conadv = values.get("conadv")
        if conadv is not None and conadv.get("input_range") is not None:
            values["conadv"] = {**conadv, "input_range": tuple(conadv["input_range"])}
        return cls(**values)


def _schedule(
    recipe: Recipe, global_batch: int, steps_per_epoch: int, total_steps: int, warmup_steps: int, base_lr: float,
    base_batch: int,
) -> schedules.Schedule:
    common: dict[str, Any] = dict(
        base_batch=base_batch, global_batch=global_batch, scaling=recipe.scaling, steps_per_epoch=steps_per_epoch
    )
    # Goyal's warmup starts at the base LR; below the base batch (peak < base LR) it starts at the peak (flat).
    start = min(base_lr, schedules.scale_lr(base_lr, base_batch, global_batch, recipe.scaling))
    warmup: dict[str, Any] = (
        dict(warmup="gradual", warmup_steps=warmup_steps, warmup_start=start) if warmup_steps else dict(warmup="none")
    )
    if recipe.decay == "step":
        # Goyal's milestones as fractions of the run; keep those after the warmup (short runs may lose some).
        milestones = sorted({round(f * total_steps) for f in STEP_MILESTONE_FRACTIONS} - {0})
        milestones = [m for m in milestones if warmup_steps < m <= total_steps]
        return schedules.make_schedule(
            base_lr, total_steps, **common, **warmup, decay="step" if milestones else "constant",
            milestones=milestones, milestone_unit="step", gamma=STEP_GAMMA,
        )
    return schedules.make_schedule(
        base_lr, total_steps, **common, **warmup, decay="poly", power=POLY_POWER, end_lr=0.0
    )


def plan_cell(
    recipe: Recipe,
    *,
    framework: str,
    global_batch: int,
    world_size: int,
    train_size: int,
    seed: int,
    epochs: int | None = None,
    total_steps: int | None = None,
    base_batch: int = BASE_BATCH,
    lr_multiplier: float = 1.0,
    warmup_fraction: float | None = None,
    study: Mapping[str, Any] | None = None,
) -> CellPlan:
    """Resolves ``recipe`` at ``global_batch`` into a :class:`CellPlan`.

    Args:
        recipe: the method.
        framework: ``"torch"`` or ``"keras"``.
        global_batch: examples per update over all workers (a multiple of
            ``world_size``, at most ``train_size``).
        world_size: Horovod processes.
        train_size: training examples (sets the steps per epoch).
        seed: model-initialisation and data-order seed.
        epochs: passes over the training set; or give ``total_steps`` instead.
        total_steps: the schedule's horizon in optimizer steps (the run's step budget).
        base_batch: the batch of ``recipe.base_lr``.
        lr_multiplier: the peak LR as a multiple of the scaled base LR (the
            warmup starts from ``base_lr * lr_multiplier``, Goyal's eta).
        warmup_fraction: warmup steps over total steps, in [0, 1); default
            ``WARMUP_FRACTION`` for recipes that warm up; must be 0 or None for the others.
        study: what a run of the batch-size study measures (stored in the plan as is).

    Raises:
        ValueError: naming the argument (indivisible batch, batch larger than
            the data, bad epochs, both or neither of ``epochs`` and ``total_steps``, ...).

    Example:
        >>> plan = plan_cell(METHODS["goyal"], framework="torch", global_batch=1024, world_size=2,
        ...                  epochs=9, train_size=60000, seed=0)
        >>> plan.steps_per_epoch, plan.schedule.peak, plan.schedule.warmup_steps
        (58, 0.8, 52)
    """
    check_choice("framework", framework, ("torch", "keras"))
    base_batch = check_positive_int("base_batch", base_batch)
    lr_multiplier = check_positive("lr_multiplier", lr_multiplier)
    per_worker = schedules.per_worker_batch_size(global_batch, world_size)
    steps_per_epoch = schedules.steps_per_epoch(train_size, global_batch)
    if (epochs is None) == (total_steps is None):
        raise ValueError(f"give exactly one of epochs and total_steps, got epochs={epochs!r}, total_steps={total_steps!r}")
    if epochs is not None:
        total_steps = check_positive_int("epochs", epochs) * steps_per_epoch
    total_steps = check_positive_int("total_steps", total_steps)
    if warmup_fraction is None:
        warmup_fraction = WARMUP_FRACTION if recipe.warmup else 0.0
    if isinstance(warmup_fraction, bool) or not isinstance(warmup_fraction, (int, float)) or not (
        0.0 <= warmup_fraction < 1.0
    ):
        raise ValueError(f"warmup_fraction must be a number in [0, 1), got {warmup_fraction!r}")
    if warmup_fraction and not recipe.warmup:
        raise ValueError(f"warmup_fraction must be 0 for {recipe.method!r} (it does not warm up), got {warmup_fraction!r}")
    warmup_steps = int(round(warmup_fraction * total_steps))
    base_lr = recipe.base_lr * lr_multiplier
    schedule = _schedule(recipe, global_batch, steps_per_epoch, total_steps, warmup_steps, base_lr, base_batch)
    record = config.optimizer_config(recipe.optimizer, lr=schedule(0), **dict(recipe.optimizer_args))
    conadv = None if recipe.conadv is None else config.ConAdvConfig(**dict(recipe.conadv)).to_dict()
    return CellPlan(
        framework=framework,
        method=recipe.method,
        global_batch=int(global_batch),
        world_size=int(world_size),
        per_worker_batch=per_worker,
        epochs=-(-total_steps // steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        optimizer=recipe.optimizer,
        optimizer_config=record.to_dict(),
        schedule=schedule,
        base_lr=base_lr,
        scaling=recipe.scaling,
        base_batch=base_batch,
        conadv=conadv,
        seed=int(seed),
        summary=recipe.summary,
        lr_multiplier=float(lr_multiplier),
        warmup_fraction=float(warmup_fraction),
        exclusions=dict(recipe.exclusions),
        study=None if study is None else json.loads(json.dumps(dict(study))),
    )
