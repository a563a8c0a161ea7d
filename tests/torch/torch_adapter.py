"""The torch adapter of the shared optimizer table (``tests/optimizer_cases.py``): core spelling -> torch.

It turns a row's core-spelling hyperparameters into ``create_optimizer``
arguments (``beta1``, ``beta2`` -> ``betas``), builds the optimizer over the
table's tensors, steps it with the table's gradients, LR sequence and CLARS
norms, reads its state under the core's slot names, and says which message a
core error becomes in torch spelling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hvd_largebatch.torch_impl import create_optimizer
from optimizer_cases import NAMES, STEPS, TENSORS, Case, clars_norms, gradients, initial_weights, relative_error

#: LAMB's two betas are one torch argument, ``betas=(beta1, beta2)``.
_BETAS = ("beta1", "beta2")
_LAMB_DEFAULT_BETAS = (0.9, 0.999)


def torch_kwargs(hyper: dict[str, Any], name: str) -> dict[str, Any]:
    """Core-spelling hyperparameters as torch constructor arguments."""
    kwargs = {k: v for k, v in hyper.items() if k not in _BETAS}
    if any(k in hyper for k in _BETAS):
        if name != "lamb":  # only LAMB has betas: pass them through so the torch side rejects them
            return dict(hyper)
        kwargs["betas"] = tuple(hyper.get(k, default) for k, default in zip(_BETAS, _LAMB_DEFAULT_BETAS))
    return kwargs


def torch_message(core_message: str) -> str:
    """The message torch shows for a core error: a beta is named as the element of ``betas`` the user wrote."""
    for index, core in enumerate(_BETAS):
        if core_message.startswith(core + " "):
            return f"betas[{index}] ({core_message})"
    return core_message


def make_torch(case: Case, weights: dict[str, np.ndarray], dtype=torch.float64, **extra: Any):
    """``(params by name, optimizer)`` for ``case`` starting from ``weights``; ``extra`` are torch-only options."""
    params = [(name, torch.nn.Parameter(torch.tensor(weights[name], dtype=dtype))) for name in NAMES]
    kwargs = {**torch_kwargs(case.hyper, case.name), **case.exclusions(), **extra}
    opt = create_optimizer(case.name, params, lr=case.lr(0), **kwargs)
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


def state_in_core_names(case: Case, params: dict[str, torch.Tensor], opt) -> dict[str, dict[str, np.ndarray]]:
    """The optimizer state as the oracle names it: ``velocity`` (torch ``momentum_buffer``), or ``mu``/``nu``."""
    keys = {"velocity": "momentum_buffer"} if case.has_momentum_buffer else {"mu": "exp_avg", "nu": "exp_avg_sq"}
    return {
        core: {n: opt.state[params[n]][key].detach().numpy().copy() for n in NAMES} for core, key in keys.items()
    }


def prev_lr_and_steps(case: Case, params: dict[str, torch.Tensor], opt) -> dict[str, Any]:
    """The scalar state, per tensor: the LR of the last step (momentum family) or the step count (LAMB)."""
    key = "prev_lr" if case.has_momentum_buffer else "step"
    return {n: float(opt.state[params[n]][key]) for n, _ in TENSORS}


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


#: Steps whose gradients are poisoned (fc.weight[1, 2]) in :func:`run_with_poisoned_steps`: both must be skipped.
POISONED = {5: float("nan"), 11: float("inf")}


def run_with_poisoned_steps(case: Case, dtype=torch.float64, **path: Any):
    """``(params, optimizer, trust ratios per applied step)`` after the table's steps with :data:`POISONED` gradients."""
    params, opt = make_torch(case, initial_weights(case), dtype=dtype, **path)
    if case.adaptive:
        opt.record_trust_ratios()
    ratios = []
    for step in range(STEPS):
        grads = gradients(step)
        if step in POISONED:
            grads["fc.weight"] = grads["fc.weight"].copy()
            grads["fc.weight"][1, 2] = POISONED[step]
        torch_step(case, params, opt, step, grads=grads)
        if case.adaptive and step not in POISONED:
            ratios.append(opt.trust_ratios())
    return params, opt, ratios


def errors_above(run_a, run_b, tolerance: float) -> dict[str, float]:
    """Relative differences above ``tolerance`` between two :func:`run_with_poisoned_steps` results.

    Weights, every state tensor and scalar, and the trust ratios of every step are compared (as float64);
    non-numeric state must be equal.
    """
    (p_a, o_a, r_a), (p_b, o_b, r_b) = run_a, run_b
    assert o_a.skipped_steps == o_b.skipped_steps == len(POISONED)
    errors = {name: relative_error(p_a[name].detach().double().numpy(), p_b[name].detach().double().numpy())
              for name, _ in TENSORS}
    s_a, s_b = state_snapshot(o_a), state_snapshot(o_b)
    assert s_a.keys() == s_b.keys()
    for key, value in s_a.items():
        if isinstance(value, float) or hasattr(value, "shape"):
            errors[key] = relative_error(np.asarray(value, dtype=np.float64), np.asarray(s_b[key], dtype=np.float64))
        else:
            assert value == s_b[key], key
    for step, (a, b) in enumerate(zip(r_a, r_b)):
        assert a.keys() == b.keys()
        errors.update({f"ratio {step} {n}": abs(a[n] - b[n]) / max(abs(b[n]), 1e-300) for n in a})
    return {key: error for key, error in errors.items() if error > tolerance}

