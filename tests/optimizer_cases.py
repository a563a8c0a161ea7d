"""The one table of optimizer cases, in core spelling, that drives both frameworks' optimizer tests.

Every row names an optimizer (a name of ``config.OPTIMIZER_NAMES``), its
hyperparameters in the core's spelling (``eps``, ``beta1``, ``beta2``; the LR
comes from the row's LR sequence), its two exclusion rules and how it is fed
(zero-initialised tensors, an LR that changes every step). The torch and Keras
tests read the rows through one small adapter each (``tests/torch/torch_adapter.py``,
``tests/tf/keras_adapter.py``) and check them against the float64 NumPy oracle
(``hvd_largebatch.reference``): oracle parity over 20 steps, the state
round trip, and the bad hyperparameters of ``BAD_HYPERPARAMETERS``. Options
that exist in one framework only (torch ``foreach``, Keras ``fused``) are a
test axis of that framework's parity test, crossed with every row.

Tensors carry torch-style names (``fc.weight``); the Keras adapter creates
them under the same path with ``/`` for ``.``, so the exclusion regexes of the
table match ``[./]`` and pick the same tensors in both frameworks.

This module imports neither torch nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from hvd_largebatch import config, reference

#: Full names and shapes: a conv, its bias, BatchNorm scale/offset, a linear layer, and a head.
TENSORS = (
    ("conv1.weight", (4, 3, 3, 3)),
    ("conv1.bias", (4,)),
    ("layer1.0.bn1.weight", (4,)),
    ("layer1.0.bn1.bias", (4,)),
    ("fc.weight", (5, 36)),
    ("fc.bias", (5,)),
    ("head.weight", (3, 5)),
)
NAMES = tuple(name for name, _ in TENSORS)
STEPS = 20
#: Relative error allowed against the oracle in float64 (ALGORITHMS.md).
TOLERANCE = 1e-10
BASE_LR = {"sgd": 0.1, "lars": 2.0, "larc": 0.05, "clars": 2.0, "lamb": 0.01}
#: LR sequences: constant; changing every step with a 0 at step 3; starting at 0 (no correction on step 1).
LR_KINDS = ("constant", "changing", "from-zero")
#: The table may grow, never shrink silently: the torch table had 57 rows before it became this one.
MINIMUM_CASES = 57


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: optimizer ``name`` under ``variant``, hyperparameters in core spelling.

    Attributes:
        name: a name of ``config.OPTIMIZER_NAMES``.
        variant: what the row exercises; ``name-variant`` is unique.
        hyper: record fields in core spelling, without ``lr`` (see ``lr_kind``).
        exclude_from_weight_decay, exclude_from_layer_adaptation: the two
            exclusion specs as both constructors take them (``None`` is the
            default rule, ``False`` excludes nothing, a regex or a list of them).
        lr_kind: one of ``LR_KINDS``.
        zero_init: names of tensors that start at zero.
    """

    name: str
    variant: str
    hyper: dict[str, Any] = dataclasses.field(default_factory=dict)
    exclude_from_weight_decay: Any = None
    exclude_from_layer_adaptation: Any = None
    lr_kind: str = "constant"
    zero_init: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.name}-{self.variant}"

    @property
    def adaptive(self) -> bool:
        """Whether the rule has a layer-wise trust ratio (every optimizer but SGD)."""
        return self.name != "sgd"

    @property
    def has_momentum_buffer(self) -> bool:
        return self.name != "lamb"

    def lr(self, step: int) -> float:
        base = BASE_LR[self.name]
        if self.lr_kind == "constant":
            return base
        if self.lr_kind == "from-zero":
            return 0.0 if step == 0 else base * (0.3 + 0.05 * step) * (1.0 + 0.5 * math.sin(step))
        if step == 3:
            return 0.0  # exercises the "previous LR was 0" branch of momentum correction
        return base * (0.2 + 0.8 * min(1.0, step / 8)) * (1.0 + 0.3 * math.sin(step))

    def exclusions(self) -> dict[str, Any]:
        """The exclusion arguments this row sets (both frameworks and the oracle take them as they are)."""
        out = {}
        if self.exclude_from_weight_decay is not None:
            out["exclude_from_weight_decay"] = self.exclude_from_weight_decay
        if self.exclude_from_layer_adaptation is not None:
            out["exclude_from_layer_adaptation"] = self.exclude_from_layer_adaptation
        return out

    def core_config(self) -> config.OptimizerConfig:
        return config.optimizer_config(self.name, lr=self.lr(0), **self.hyper)


def _variants(name: str) -> list[Case]:
    momentum_family = name != "lamb"
    adaptive = name != "sgd"
    decay = {"weight_decay": 0.01} if name != "lamb" else {}
    adapt_regex = {"exclude_from_layer_adaptation": [r"^fc[./]"]} if adaptive else {}
    rows = [
        Case(name, "plain", dict(decay)),
        Case(name, "no-decay", {"weight_decay": 0.0}),
        Case(name, "decay-on", {"weight_decay": 0.05}),
        Case(name, "excluded", dict(decay), exclude_from_weight_decay=[r"head", r"conv1[./]bias"], **adapt_regex),
        Case(
            name, "excluded-one-regex", dict(decay), exclude_from_weight_decay=r"head|bias",
            **({"exclude_from_layer_adaptation": r"bn1|^fc[./]weight"} if adaptive else {}),
        ),
        Case(
            name, "exclude-nothing", dict(decay), exclude_from_weight_decay=False,
            **({"exclude_from_layer_adaptation": False} if adaptive else {}),
        ),
        Case(name, "zero-init", dict(decay), zero_init=("fc.weight", "conv1.bias")),
        Case(name, "changing-lr", dict(decay), lr_kind="changing"),
    ]
    if momentum_family:
        rows += [
            Case(name, "nesterov", {**decay, "nesterov": True}),
            Case(name, "nesterov-changing-lr", {**decay, "nesterov": True}, lr_kind="changing"),
            Case(name, "no-momentum-correction", {**decay, "momentum_correction": False}, lr_kind="changing"),
            Case(name, "momentum-0", {**decay, "momentum": 0.0}),
        ]
    if adaptive and momentum_family:
        rows += [Case(name, "eps", {**decay, "eps": 1e-3, "trust_coefficient": 0.02})]
    if name in ("lars", "clars"):  # larc is clip already
        rows += [Case(name, "clip", {**decay, "clip": True})]
    if momentum_family:
        clip = {"clip": True} if name in ("lars", "clars") else {}
        rows += [
            Case(
                name, "combined-from-zero",
                {**decay, **clip, "nesterov": True, **({"trust_coefficient": 0.1} if adaptive else {})},
                exclude_from_weight_decay=False, lr_kind="from-zero", zero_init=("conv1.weight",),
                **({"exclude_from_layer_adaptation": False} if adaptive else {}),
            )
        ]
    if name == "lamb":
        rows += [
            Case(name, "betas-eps", {"beta1": 0.8, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.1}),
            Case(
                name, "combined-from-zero", {"beta1": 0.85, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.05},
                exclude_from_weight_decay=False, exclude_from_layer_adaptation=False, lr_kind="from-zero",
                zero_init=("conv1.weight",),
            ),
        ]
    return rows


CASES: list[Case] = [case for name in config.OPTIMIZER_NAMES for case in _variants(name)]
CASE_IDS: list[str] = [case.id for case in CASES]


def one_case_per_optimizer(variant: str) -> list[Case]:
    """The row of ``variant`` for every optimizer that has one (selection by meaning, not by position)."""
    return [case for case in CASES if case.variant == variant]


def case_named(case_id: str) -> Case:
    return next(case for case in CASES if case.id == case_id)


# --------------------------------------------------------------------------
# Data: weights, gradients, CLARS norms (the same NumPy arrays for every framework)
# --------------------------------------------------------------------------
def initial_weights(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in TENSORS:
        weights[name] = np.zeros(shape) if name in case.zero_init else rng.normal(0.0, 0.5, shape)
    return weights


def gradients(step: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Gradients of step ``step``; ``layer1.0.bn1.bias`` gets a zero gradient for the first 3 steps."""
    rng = np.random.default_rng(1000 * seed + step)
    grads = {name: rng.normal(0.0, 0.1, shape) * (1 + 0.5 * i) for i, (name, shape) in enumerate(TENSORS)}
    if step < 3:
        grads["layer1.0.bn1.bias"] = np.zeros_like(grads["layer1.0.bn1.bias"])
    return grads


def clars_norms(step: int) -> dict[str, float]:
    """Stand-in per-example norm means ``s`` (positive; one tensor gets 0 at step 2)."""
    rng = np.random.default_rng(5000 + step)
    norms = {name: float(rng.uniform(0.05, 1.0)) for name, _ in TENSORS}
    if step == 2:
        norms["fc.weight"] = 0.0
    return norms


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------
def make_reference(case: Case, paths: tuple[str, ...] = NAMES) -> reference.ReferenceOptimizer:
    """The oracle for ``case`` over ``TENSORS``, its exclusion rules matched on ``paths``."""
    shapes = [shape for _, shape in TENSORS]
    return reference.ReferenceOptimizer.for_tensors(case.core_config(), list(paths), shapes, **case.exclusions())


def reference_step(case: Case, oracle, weights: dict[str, np.ndarray], step: int, grads=None) -> dict[str, np.ndarray]:
    grads = gradients(step) if grads is None else grads
    norms = [clars_norms(step)[n] for n in NAMES] if case.name == "clars" else None
    new = oracle.step([weights[n] for n in NAMES], [grads[n] for n in NAMES], case.lr(step), grad_norms=norms)
    return dict(zip(NAMES, new))


def oracle_state(case: Case, oracle) -> dict[str, dict[str, np.ndarray]]:
    """The oracle's per-tensor state under the core's slot names: ``velocity``, or ``mu`` and ``nu``."""
    keys = ("velocity",) if case.has_momentum_buffer else ("mu", "nu")
    return {key: dict(zip(NAMES, oracle.state[key])) for key in keys}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (the scale floored at the smallest positive double)."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-300)
    return float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - expected))) / scale


def parity_errors(case: Case, weights: dict[str, np.ndarray], state: dict[str, dict[str, np.ndarray]], oracle,
                  expected: dict[str, np.ndarray]) -> dict[str, float]:
    """Relative errors of the weights and of every state slot against the oracle, keyed ``slot/name``."""
    errors = {f"weight/{n}": relative_error(weights[n], expected[n]) for n in NAMES}
    for slot, per_tensor in oracle_state(case, oracle).items():
        for n in NAMES:
            errors[f"{slot}/{n}"] = relative_error(state[slot][n], per_tensor[n])
    return errors


# --------------------------------------------------------------------------
# Bad hyperparameters, in core spelling: every framework must refuse them as the core does
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BadInput:
    """One bad hyperparameter: ``create_optimizer(name, **hyper)`` in core spelling must raise ValueError."""

    id: str
    name: str
    hyper: dict[str, Any]

    def core_error(self) -> ValueError:
        """The error the core record raises (its message is the one every framework must show)."""
        try:
            config.optimizer_config(self.name, **self.hyper)
        except ValueError as error:
            return error
        raise AssertionError(f"{self.id}: the core accepts {self.hyper!r}")


BAD_HYPERPARAMETERS: list[BadInput] = [
    BadInput("sgd-lr-negative", "sgd", {"lr": -0.1}),
    BadInput("lars-lr-nan", "lars", {"lr": math.nan}),
    BadInput("lars-lr-inf", "lars", {"lr": math.inf}),
    BadInput("lamb-lr-negative", "lamb", {"lr": -1e-3}),
    BadInput("sgd-momentum-1", "sgd", {"momentum": 1.0}),
    BadInput("lars-momentum-negative", "lars", {"momentum": -0.1}),
    BadInput("clars-momentum-nan", "clars", {"momentum": math.nan}),
    BadInput("sgd-weight_decay-negative", "sgd", {"weight_decay": -1e-4}),
    BadInput("lars-weight_decay-inf", "lars", {"weight_decay": math.inf}),
    BadInput("lamb-weight_decay-nan", "lamb", {"weight_decay": math.nan}),
    BadInput("lars-trust_coefficient-0", "lars", {"trust_coefficient": 0.0}),
    BadInput("larc-trust_coefficient-negative", "larc", {"trust_coefficient": -0.001}),
    BadInput("clars-trust_coefficient-nan", "clars", {"trust_coefficient": math.nan}),
    BadInput("lars-eps-negative", "lars", {"eps": -1e-9}),
    BadInput("lamb-eps-negative", "lamb", {"eps": -1e-6}),
    BadInput("lamb-eps-inf", "lamb", {"eps": math.inf}),
    BadInput("lamb-beta1-1", "lamb", {"beta1": 1.0}),
    BadInput("lamb-beta2-negative", "lamb", {"beta2": -0.1}),
    BadInput("sgd-nesterov-not-bool", "sgd", {"nesterov": 1}),
    BadInput("lars-nesterov-without-momentum", "lars", {"nesterov": True, "momentum": 0.0}),
    BadInput("lars-clip-not-bool", "lars", {"clip": "yes"}),
    BadInput("larc-clip-false", "larc", {"clip": False}),
    BadInput("sgd-momentum_correction-not-bool", "sgd", {"momentum_correction": None}),
    BadInput("lars-nonfinite-unknown", "lars", {"nonfinite": "ignore"}),
    BadInput("lamb-nonfinite-not-a-string", "lamb", {"nonfinite": True}),
    BadInput("clars-estimator-unknown", "clars", {"estimator": "approx"}),
    BadInput("clars-estimator-microbatch-0", "clars", {"estimator": "microbatch:0"}),
    BadInput("clars-chunk_size-0", "clars", {"chunk_size": 0}),
    BadInput("clars-chunk_size-float", "clars", {"chunk_size": 2.5}),
    BadInput("lars-lr-string", "lars", {"lr": "0.1"}),
    BadInput("unknown-name", "adamw", {}),
]
