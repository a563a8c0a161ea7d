"""Momentum SGD with the learning rate inside the velocity and momentum correction (the large-batch baseline)."""

from __future__ import annotations

from typing import Any

from hvd_largebatch import config
from hvd_largebatch.torch_impl.momentum_optimizer import MomentumOptimizer
from hvd_largebatch.torch_impl.optimizer_base import constructor_defaults

__all__ = ["SGD"]

_D = config.SGDConfig  # defaults come from the core record


class SGD(MomentumOptimizer):
    r"""Momentum SGD in Goyal et al.'s form, with momentum correction.

    Per tensor, with ``gamma_t`` the global LR and ``c = gamma_t / gamma_prev``
    (ALGORITHMS.md, "SGD with momentum"):

    .. code-block:: text

        d = g + beta * w              (if decay applies to the tensor)
        v = m * c * v + gamma_t * d
        w = w - v                     (Nesterov: w - (m * v + gamma_t * d))

    Reference: Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training
    ImageNet in 1 Hour", section 2.2 (LR inside the velocity, momentum
    correction).

    Note where we differ from ``torch.optim.SGD``: torch keeps the LR outside
    the velocity (``v = m*v + d; w -= lr*v``), which is the same trajectory
    at constant LR but not when the LR changes; and by default weight decay
    skips biases and normalisation parameters (the package's default
    exclusion rule) where torch decays every tensor. Pass
    ``exclude_from_weight_decay=False`` to decay everything.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``;
            the exclusion rule then sees full names) or param-group dicts.
        lr: global learning rate ``gamma`` (>= 0).
        momentum: ``m`` in [0, 1).
        weight_decay: ``beta`` (>= 0), coupled (added to the gradient).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        momentum_correction: rescale the velocity when the LR changes.
        exclude_from_weight_decay: None (default rule: ``ndim <= 1`` or a
            name matching bias/bn/batchnorm/norm), False (decay everything),
            regexes matched on full names, or a callable ``(name, shape) -> bool``
            returning True for excluded tensors.
        foreach, fused, nonfinite: as :class:`~hvd_largebatch.torch_impl.optimizer_base.LargeBatchOptimizer`.

    Raises:
        ValueError: naming the argument, for any value out of range.

    Example:
        >>> import torch
        >>> from hvd_largebatch.torch_impl import SGD
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGD(model.named_parameters(), lr=0.1, weight_decay=1e-4)
        >>> model(torch.ones(1, 4)).sum().backward()
        >>> opt.step()
        >>> [row["decay"] for row in opt.tensor_switches()]
        [True, False]
    """

    config_type = config.SGDConfig
    uses_adaptation = False

    def __init__(
        self,
        params: Any,
        lr: float = _D.lr,
        momentum: float = _D.momentum,
        weight_decay: float = _D.weight_decay,
        nesterov: bool = _D.nesterov,
        momentum_correction: bool = _D.momentum_correction,
        exclude_from_weight_decay: config.ExclusionSpec = None,
        foreach: bool | None = None,
        fused: bool | str | None = None,
        nonfinite: str = _D.nonfinite,
    ) -> None:
        super().__init__(params, constructor_defaults(locals()), exclude_from_weight_decay)
