"""LAMB: Adam directions scaled per layer by the trust ratio ``||w|| / ||u||``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hvd_largebatch import config
from hvd_largebatch.torch_impl import core_spelling
from hvd_largebatch.torch_impl.lamb_functional import lamb_update
from hvd_largebatch.torch_impl.mixed_precision import state_dtype
from hvd_largebatch.torch_impl.optimizer_base import (
    ADAPT_MASK,
    DECAY_MASK,
    GroupWork,
    LargeBatchOptimizer,
    constructor_defaults,
)

__all__ = ["LAMB"]

_D = config.LAMBConfig  # defaults come from the core record


class LAMB(LargeBatchOptimizer):
    r"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes").

    Per tensor, ``t`` counting this tensor's updates from 1 (ALGORITHMS.md, "LAMB"):

    .. code-block:: text

        mu = b1 * mu + (1 - b1) * g ;   nu = b2 * nu + (1 - b2) * g^2
        u  = (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps) + beta * w     (beta term if decay)
        r  = ||w|| / ||u||    if adapt and ||w|| > 0 and ||u|| > 0, else 1
        w  = w - gamma_t * r * u

    Note where we differ from the paper: ``phi`` is the identity, bias
    correction is always on, and there is no momentum correction (the LR is
    not inside any state). Tensors excluded from adaptation (by default
    biases and normalisation parameters) take the plain AdamW-like direction
    ``u`` with ratio 1; by default they also get no weight decay.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts.
        lr: global learning rate (>= 0).
        betas: ``(b1, b2)``, each in [0, 1).
        eps: added to the square root (>= 0).
        weight_decay: ``beta`` (>= 0), decoupled from the moments but inside ``u``.
        exclude_from_weight_decay, exclude_from_layer_adaptation: as :class:`LARS`.
        foreach, fused, nonfinite: as :class:`~hvd_largebatch.torch_impl.optimizer_base.LargeBatchOptimizer`.
            No torch kernel computes LAMB's rule, so ``fused`` True and
            False both take the ``foreach`` path; ``fused="numba"`` (and
            None where it picks numba) runs two compiled loops per tensor
            (moments and norms, then the step).

    Raises:
        ValueError: naming the argument, for any value out of range.

    Example:
        >>> import torch
        >>> from hvd_largebatch.torch_impl import LAMB
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LAMB(model.named_parameters(), lr=1e-3)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['exp_avg', 'exp_avg_sq', 'step']
    """

    config_type = config.LAMBConfig

    def __init__(
        self,
        params: Any,
        lr: float = _D.lr,
        betas: tuple[float, float] = (_D.beta1, _D.beta2),
        eps: float = _D.eps,
        weight_decay: float = _D.weight_decay,
        exclude_from_weight_decay: config.ExclusionSpec = None,
        exclude_from_layer_adaptation: config.ExclusionSpec = None,
        foreach: bool | None = None,
        fused: bool | str | None = None,
        nonfinite: str = _D.nonfinite,
    ) -> None:
        self._workspace: dict = {}  # reused temporaries of the foreach path, never saved
        super().__init__(params, constructor_defaults(locals()), exclude_from_weight_decay, exclude_from_layer_adaptation)

    def _record_kwargs(self, group: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super()._record_kwargs(group)
        if "betas" in group:
            kwargs.update(core_spelling.to_core({"betas": group["betas"]}))
        return kwargs

    def _record_from_group(self, group: Mapping[str, Any]) -> Any:
        try:
            return super()._record_from_group(group)
        except ValueError as error:
            raise core_spelling.error_in_torch_spelling(error) from None

    def _write_record(self, group: dict[str, Any], record: Any) -> None:
        for key in ("lr", "eps", "weight_decay", "nonfinite"):
            group[key] = getattr(record, key)
        group["betas"] = (record.beta1, record.beta2)

    def _apply_group(self, group: dict[str, Any], work: GroupWork, ratios_out: list | None) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in work.params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(int(state["step"]) + 1)
        beta1, beta2 = group["betas"]
        lamb_update(
            work.params,
            work.grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decay=[group[DECAY_MASK][i] for i in work.positions],
            adapt=[group[ADAPT_MASK][i] for i in work.positions],
            foreach=self._foreach(group),
            trust_ratios_out=ratios_out,
            workspace=self._workspace,
            fused=self._fused(group),
        )
        for p, step in zip(work.params, steps):
            self.state[p]["step"] = step

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_workspace", {})
