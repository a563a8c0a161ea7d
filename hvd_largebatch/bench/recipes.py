"""The training recipes compared by the batch-size sweep, with every hyperparameter written down.

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

========  ===============  ===========  ==============================================
method    optimizer        LR scaling   schedule
========  ===============  ===========  ==============================================
sgd       momentum SGD     linear       no warmup, step decay x0.1 at 1/3, 2/3, 8/9
goyal     momentum SGD     linear       gradual warmup (Goyal), same step decay
lars      LARS             sqrt         gradual warmup, poly(2) decay to 0
clars     CLARS (exact)    sqrt         no warmup, poly(2) decay to 0
lamb      LAMB             sqrt         gradual warmup, poly(2) decay to 0
conadv    ConAdv + LARS    sqrt         as lars (mean of clean and adversarial loss)
========  ===============  ===========  ==============================================

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
* Base LRs were fixed once from 5-epoch runs at the base batch (128, the
  smallest in the sweep), the best test accuracy of a small grid per
  optimizer, and are then only scaled; CLARS and ConAdv reuse LARS's. The
  grid and its results are in ``BASE_LR_SEARCH`` and the README.
"""

from __future__ import annotations

import dataclasses
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
    "lars": 8.0,
    "clars": 8.0,
    "lamb": 0.02,
    "conadv": 8.0,
}

_SGD_ARGS = {"momentum": 0.9, "weight_decay": 5e-4}
_LARS_ARGS = {"momentum": 0.9, "weight_decay": 5e-4, "trust_coefficient": 0.001}
_LAMB_ARGS = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01}

_SCHEDULE_KINDS = ("step", "poly")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One method of the sweep.

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

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, config.OPTIMIZER_NAMES)
        object.__setattr__(self, "base_lr", check_positive("base_lr", self.base_lr))
        check_choice("scaling", self.scaling, ("linear", "sqrt"))
        check_choice("decay", self.decay, _SCHEDULE_KINDS)
        config.optimizer_config(self.optimizer, **dict(self.optimizer_args))  # validates the arguments
        if self.conadv is not None:
            config.ConAdvConfig(**dict(self.conadv))

    def with_base_lr(self, base_lr: float) -> Recipe:
        """A copy with another base LR (``hvd-largebatch bench --base-lr METHOD=LR``)."""
        return dataclasses.replace(self, base_lr=base_lr)


def _recipe(method: str, summary: str, optimizer: str, args: Mapping[str, Any], **kw: Any) -> Recipe:
    conadv = kw.pop("conadv", None)
    return Recipe(
        method=method,
        summary=summary,
        optimizer=optimizer,
        optimizer_args=tuple(sorted(args.items())),
        base_lr=BASE_LRS[method],
        conadv=None if conadv is None else tuple(sorted(conadv.items())),
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
        _recipe("lars", "LARS, sqrt scaling, gradual warmup, poly(2) decay (You et al. 2017)", "lars", _LARS_ARGS,
                scaling="sqrt", warmup=True, decay="poly"),
        _recipe("clars", "CLARS (exact per-example norms), sqrt scaling, no warmup, poly(2) (Huo et al. 2021)",
                "clars", {**_LARS_ARGS, "estimator": "exact"}, scaling="sqrt", warmup=False, decay="poly"),
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
    """One resolved training run of the sweep: everything a runner needs and a report prints.

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

    @property
    def key(self) -> str:
        """``framework:method:global_batch``, the cell's identity in results.json."""
        return f"{self.framework}:{self.method}:{self.global_batch}"

    @property
    def label(self) -> str:
        return f"{self.framework} {self.method} batch {self.global_batch}"

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


def _schedule(recipe: Recipe, global_batch: int, steps_per_epoch: int, epochs: int, base_batch: int):
    warmup_epochs = WARMUP_FRACTION * epochs if recipe.warmup else 0.0
    if recipe.decay == "step":
        milestones = [fraction * epochs for fraction in STEP_MILESTONE_FRACTIONS]
        # Keep milestones that land after the warmup and inside the run (short runs may lose some).
        total = schedules.epochs_to_steps(epochs, steps_per_epoch)
        warm = schedules.epochs_to_steps(warmup_epochs, steps_per_epoch, "warmup_epochs")
        milestones = [m for m in milestones if warm / steps_per_epoch < m <= total / steps_per_epoch]
        if not recipe.warmup:
            return schedules.make_schedule(
                recipe.base_lr, total, base_batch=base_batch, global_batch=global_batch, scaling=recipe.scaling,
                warmup="none", decay="step" if milestones else "constant", milestones=milestones,
                milestone_unit="epoch", steps_per_epoch=steps_per_epoch, gamma=STEP_GAMMA,
            )
        if recipe.scaling != "linear":
            raise ValueError(f"scaling must be 'linear' for Goyal's recipe, got {recipe.scaling!r}")
        return schedules.goyal(
            recipe.base_lr, base_batch, global_batch, steps_per_epoch, epochs=epochs,
            warmup_epochs=warmup_epochs, milestones=milestones, gamma=STEP_GAMMA,
        )
    if recipe.warmup:
        return schedules.lars_poly(
            recipe.base_lr, base_batch, global_batch, steps_per_epoch, epochs,
            warmup_epochs=warmup_epochs, power=POLY_POWER, end_lr=0.0, scaling=recipe.scaling,
        )
    return schedules.make_schedule(
        recipe.base_lr, schedules.epochs_to_steps(epochs, steps_per_epoch), base_batch=base_batch,
        global_batch=global_batch, scaling=recipe.scaling, warmup="none", decay="poly", power=POLY_POWER,
        end_lr=0.0, steps_per_epoch=steps_per_epoch,
    )


def plan_cell(
    recipe: Recipe,
    *,
    framework: str,
    global_batch: int,
    world_size: int,
    epochs: int,
    train_size: int,
    seed: int,
    base_batch: int = BASE_BATCH,
) -> CellPlan:
    """Resolves ``recipe`` at ``global_batch`` into a :class:`CellPlan`.

    Args:
        recipe: the method.
        framework: ``"torch"`` or ``"keras"``.
        global_batch: examples per update over all workers (a multiple of
            ``world_size``, at most ``train_size``).
        world_size: Horovod processes.
        epochs: passes over the training set.
        train_size: training examples (sets the steps per epoch).
        seed: model-initialisation and data-order seed.
        base_batch: the batch of ``recipe.base_lr``.

    Raises:
        ValueError: naming the argument (indivisible batch, batch larger than
            the data, bad epochs, ...).

    Example:
        >>> plan = plan_cell(METHODS["goyal"], framework="torch", global_batch=1024, world_size=2,
        ...                  epochs=9, train_size=60000, seed=0)
        >>> plan.steps_per_epoch, plan.schedule.peak, plan.schedule.warmup_steps
        (58, 0.8, 52)
    """
    check_choice("framework", framework, ("torch", "keras"))
    epochs = check_positive_int("epochs", epochs)
    base_batch = check_positive_int("base_batch", base_batch)
    per_worker = schedules.per_worker_batch_size(global_batch, world_size)
    steps_per_epoch = schedules.steps_per_epoch(train_size, global_batch)
    schedule = _schedule(recipe, global_batch, steps_per_epoch, epochs, base_batch)
    record = config.optimizer_config(recipe.optimizer, lr=schedule(0), **dict(recipe.optimizer_args))
    conadv = None if recipe.conadv is None else config.ConAdvConfig(**dict(recipe.conadv)).to_dict()
    return CellPlan(
        framework=framework,
        method=recipe.method,
        global_batch=int(global_batch),
        world_size=int(world_size),
        per_worker_batch=per_worker,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        optimizer=recipe.optimizer,
        optimizer_config=record.to_dict(),
        schedule=schedule,
        base_lr=recipe.base_lr,
        scaling=recipe.scaling,
        base_batch=base_batch,
        conadv=conadv,
        seed=int(seed),
        summary=recipe.summary,
    )
