"""LARS and its clip mode LARC: layer-wise adaptive rate scaling for large-batch SGD."""

from __future__ import annotations

from typing import Any

from hvd_largebatch import config
from hvd_largebatch.torch_impl.momentum_optimizer import MomentumOptimizer
from hvd_largebatch.torch_impl.optimizer_base import GroupWork, constructor_defaults

__all__ = ["LARS"]

_D = config.LARSConfig  # defaults come from the core record


class LARS(MomentumOptimizer):
    r"""LARS (``clip=False``) or LARC (``clip=True``), with the LR inside the velocity.

    Per tensor ("layer") ``w`` with gradient ``g``, global LR ``gamma_t`` and
    momentum correction ``c = gamma_t / gamma_prev`` (ALGORITHMS.md, "LARS"):

    .. code-block:: text

        d      = g + beta * w                                   (if decay, else g)
        lambda = eta * ||w|| / (||g|| + beta * ||w|| + eps)      if adapt and ||w|| > 0 and ||g|| > 0
               = 1                                               otherwise
        rate   = gamma_t * lambda          (LARS)
               = min(gamma_t, lambda)      (LARC, adapted tensors; gamma_t for the others)
        v      = m * c * v + rate * d
        w      = w - v                     (Nesterov: w - (m * v + rate * d))

    ``beta * ||w||`` enters the denominator only for tensors that weight decay
    applies to. Tensors excluded from adaptation (by default biases and
    normalisation parameters) get plain momentum SGD.

    References: You, Gitman, Ginsburg 2017, "Large Batch Training of
    Convolutional Networks", Algorithm 1; clip mode as NVIDIA apex ``LARC``
    and timm's ``trust_clip``; momentum correction from Goyal et al. 2017.

    Note where we differ: the paper's velocity does not hold the LR; ours
    does (Goyal's form), with momentum correction, which at a constant LR
    gives the same trajectory as timm's ``Lars(always_adapt=True)``. The
    zero tests are on ``||w||`` and on the raw ``||g||`` (as timm and apex).

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``;
            exclusion rules then see full names) or param-group dicts.
        lr: global learning rate ``gamma`` (>= 0).
        momentum: ``m`` in [0, 1).
        weight_decay: ``beta`` (>= 0).
        trust_coefficient: ``eta`` (> 0).
        eps: denominator constant (>= 0).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        clip: LARC mode.
        momentum_correction: rescale the velocity when the LR changes.
        exclude_from_weight_decay: which tensors get no weight decay: None
            (default rule: ``ndim <= 1`` or a full name matching
            bias/bn/batchnorm/norm), False (none), regexes on full names, or a
            callable ``(name, shape) -> bool`` (True = excluded).
        exclude_from_layer_adaptation: the same, for the trust ratio.
        foreach, fused, nonfinite: as :class:`~hvd_largebatch.torch_impl.optimizer_base.LargeBatchOptimizer`.

    Raises:
        ValueError: naming the argument, for any value out of range.

    Example:
        >>> import torch
        >>> from hvd_largebatch.torch_impl import LARS
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
        >>> opt = LARS(model.named_parameters(), lr=0.1, weight_decay=5e-4)
        >>> [(row["name"], row["adapt"]) for row in opt.tensor_switches()][:3]
        [('0.weight', True), ('0.bias', False), ('1.weight', False)]
        >>> model(torch.randn(16, 4)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.skipped_steps
        0
    """

    config_type = config.LARSConfig

    def __init__(
        self,
        params: Any,
        lr: float = _D.lr,
        momentum: float = _D.momentum,
        weight_decay: float = _D.weight_decay,
        trust_coefficient: float = _D.trust_coefficient,
        eps: float = _D.eps,
        nesterov: bool = _D.nesterov,
        clip: bool = _D.clip,
        momentum_correction: bool = _D.momentum_correction,
        exclude_from_weight_decay: config.ExclusionSpec = None,
        exclude_from_layer_adaptation: config.ExclusionSpec = None,
        foreach: bool | None = None,
        fused: bool | str | None = None,
        nonfinite: str = _D.nonfinite,
    ) -> None:
        super().__init__(params, constructor_defaults(locals()), exclude_from_weight_decay, exclude_from_layer_adaptation)

    def _resolve_rate_norms(self, work: list[GroupWork]) -> None:
        for group_work in work:
            group_work.rate_norms = group_work.grad_norms
