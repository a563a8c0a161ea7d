"""Bookkeeping of the momentum optimizers (SGD, LARS/LARC, CLARS): velocity state and momentum correction.

State per parameter: ``momentum_buffer`` (the velocity ``v``, which holds the
learning rate) and ``prev_lr`` (the global LR of the last update applied to
this tensor, None before the first). Momentum correction (Goyal et al. 2017,
section 2.2) rescales ``v`` by the core's
:func:`hvd_largebatch.schedules.momentum_correction` factor ``lr / prev_lr``
(1 when ``prev_lr`` is 0) when the LR changes; keeping
``prev_lr`` in the state makes it survive ``state_dict()`` /
``load_state_dict()``, so a resumed run continues exactly. The velocity of a
float16/bfloat16 parameter is float32 (``mixed_precision.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from hvd_largebatch.schedules import momentum_correction
from hvd_largebatch.torch_impl.mixed_precision import state_dtype
from hvd_largebatch.torch_impl.momentum_functional import momentum_update
from hvd_largebatch.torch_impl.optimizer_base import ADAPT_MASK, DECAY_MASK, GroupWork, LargeBatchOptimizer

__all__ = ["MomentumOptimizer"]


class MomentumOptimizer(LargeBatchOptimizer):
    """Base of SGD, LARS and CLARS; subclasses say whether and how the trust ratio applies."""

    @property
    def _reads_weight_norms_first(self) -> bool:
        return self.uses_adaptation

    def _apply_group(self, group: dict[str, Any], work: GroupWork, ratios_out: list | None) -> None:
        lr = group["lr"]
        velocities, corrections = [], []
        factors: dict[float, float] = {}  # the tensors of a group nearly always share prev_lr: one factor each
        for p in work.params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
                state["prev_lr"] = None
            velocities.append(state["momentum_buffer"])
            prev = state["prev_lr"]
            if not group["momentum_correction"] or prev is None:
                corrections.append(1.0)
                continue
            if prev not in factors:
                factors[prev] = momentum_correction(prev, lr)
            corrections.append(factors[prev])
        adapt = [group[ADAPT_MASK][i] for i in work.positions] if self.uses_adaptation else None
        momentum_update(
            work.params,
            work.grads,
            velocities,
            lr=lr,
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            decay=[group[DECAY_MASK][i] for i in work.positions],
            velocity_corrections=corrections,
            nesterov=group["nesterov"],
            adapt=adapt,
            grad_norms=work.rate_norms,
            trust_coefficient=group.get("trust_coefficient", 0.0),
            eps=group.get("eps", 0.0),
            clip=group.get("clip", False),
            foreach=self._foreach(group),
            local_rates_out=ratios_out,
            fused=self._fused(group),
            weight_norms=work.weight_norms,
        )
        for p in work.params:
            self.state[p]["prev_lr"] = lr
