"""The table of optimizer configurations that drives the torch unit tests, and helpers to run them.

Each case names an optimizer (``create_optimizer`` name), its torch keyword
arguments, a learning-rate sequence and the tensors it trains. The same table
feeds the oracle parity test, the foreach/single-tensor test and the state
round-trip test (STYLE.md: tests are tables).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from hvd_largebatch import config, reference
from hvd_largebatch.torch_impl import create_optimizer

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
STEPS = 20
BASE_LR = {"sgd": 0.1, "lars": 2.0, "larc": 0.05, "clars": 2.0, "lamb": 0.01}


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: optimizer ``name`` with torch ``kwargs`` under the variant ``variant``."""

    name: str
    variant: str
    kwargs: dict[str, Any]
    changing_lr: bool = False
    zero_init: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.name}-{self.variant}"

    def lr(self, step: int) -> float:
        base = BASE_LR[self.name]
        if not self.changing_lr:
            return base
        if step == 3:
            return 0.0  # exercises the "previous LR was 0" branch of momentum correction
        return base * (0.2 + 0.8 * min(1.0, step / 8)) * (1.0 + 0.3 * math.sin(step))

    def core_kwargs(self) -> dict[str, Any]:
        """The kwargs in core spelling (for ``config.optimizer_config``), without torch-only options."""
        kwargs = {k: v for k, v in self.kwargs.items() if not k.startswith("exclude_") and k != "foreach"}
        if "betas" in kwargs:
            kwargs["beta1"], kwargs["beta2"] = kwargs.pop("betas")
        return kwargs

    def exclusions(self) -> dict[str, Any]:
        return {k: v for k, v in self.kwargs.items() if k.startswith("exclude_")}


def _variants(name: str) -> list[Case]:
    momentum_family = name != "lamb"
    adaptive = name != "sgd"
    decay = {"weight_decay": 0.01} if name != "lamb" else {}
    rows = [
        Case(name, "plain", dict(decay)),
        Case(name, "no-decay", {"weight_decay": 0.0}),
        Case(name, "decay-on", {"weight_decay": 0.05}),
        Case(name, "excluded", {**decay, "exclude_from_weight_decay": [r"head", r"conv1\.bias"],
                                **({"exclude_from_layer_adaptation": [r"^fc\."]} if adaptive else {})}),
        Case(name, "exclude-nothing", {**decay, "exclude_from_weight_decay": False,
                                       **({"exclude_from_layer_adaptation": False} if adaptive else {})}),
        Case(name, "zero-init", dict(decay), zero_init=("fc.weight", "conv1.bias")),
        Case(name, "changing-lr", dict(decay), changing_lr=True),
    ]
    if momentum_family:
        rows += [
            Case(name, "nesterov", {**decay, "nesterov": True}),
            Case(name, "nesterov-changing-lr", {**decay, "nesterov": True}, changing_lr=True),
            Case(name, "no-momentum-correction", {**decay, "momentum_correction": False}, changing_lr=True),
            Case(name, "momentum-0", {**decay, "momentum": 0.0}),
        ]
    if adaptive and momentum_family:
        rows += [Case(name, "eps", {**decay, "eps": 1e-3, "trust_coefficient": 0.02})]
        if name != "larc":
            rows += [Case(name, "clip", {**decay, "clip": True})] if name != "clars" else []
    if name == "lamb":
        rows += [Case(name, "betas-eps", {"betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.1})]
    if name == "clars":
        rows += [Case(name, "clip", {**decay, "clip": True})]
    return rows


CASES: list[Case] = [case for name in config.OPTIMIZER_NAMES for case in _variants(name)]


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


def make_torch(case: Case, weights: dict[str, np.ndarray], dtype=torch.float64, **extra: Any):
    params = [(name, torch.nn.Parameter(torch.tensor(weights[name], dtype=dtype))) for name, _ in TENSORS]
    opt = create_optimizer(case.name, params, lr=case.lr(0), **{**case.kwargs, **extra})
    return dict(params), opt


def torch_step(case: Case, params: dict[str, torch.Tensor], opt, step: int, grads=None) -> None:
    grads = gradients(step) if grads is None else grads
    for name, p in params.items():
        p.grad = torch.tensor(grads[name], dtype=p.dtype)
    for group in opt.param_groups:
        group["lr"] = case.lr(step)
    if case.name == "clars":
        opt.set_grad_norms(clars_norms(step))
    opt.step()


def make_reference(case: Case) -> reference.ReferenceOptimizer:
    cfg = config.optimizer_config(case.name, **case.core_kwargs())
    names, shapes = zip(*TENSORS)
    return reference.ReferenceOptimizer.for_tensors(cfg, names, shapes, **case.exclusions())


def reference_step(case: Case, oracle, weights: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    names = [name for name, _ in TENSORS]
    grads = gradients(step)
    norms = [clars_norms(step)[n] for n in names] if case.name == "clars" else None
    new = oracle.step([weights[n] for n in names], [grads[n] for n in names], case.lr(step), grad_norms=norms)
    return dict(zip(names, new))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    return float(np.max(np.abs(np.asarray(actual) - expected))) / scale


def state_snapshot(opt) -> dict[str, Any]:
    """Every state tensor (as float64 NumPy) and scalar, keyed by ``name/key``, plus the skip count."""
    names = {id(p): n for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
    snapshot: dict[str, Any] = {"skipped_steps": opt.skipped_steps}
    for p, state in opt.state.items():
        for key, value in state.items():
            snapshot[f"{names[id(p)]}/{key}"] = (
                value.detach().to(torch.float64).numpy().copy() if isinstance(value, torch.Tensor) else value
            )
    return snapshot
