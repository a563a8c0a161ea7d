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
from optimizer_cases import NAMES, TENSORS, Case, clars_norms, gradients

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
