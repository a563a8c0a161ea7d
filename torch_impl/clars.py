"""CLARS: LARS whose trust ratio divides by the mean per-example gradient norm (meant to run without warmup)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hvd_largebatch import config
from hvd_largebatch.torch_impl.momentum_optimizer import MomentumOptimizer
from hvd_largebatch.torch_impl.optimizer_base import ADAPT_MASK, GroupWork, constructor_defaults
from hvd_largebatch.torch_impl.per_example_norms import LossFn, loss_and_grad_norm_sums, per_example_grad_norm_sums

__all__ = ["CLARS"]

_D = config.CLARSConfig  # defaults come from the core record


class CLARS(MomentumOptimizer):
    r"""CLARS (Huo, Gu, Huang, AAAI 2021, "Large Batch Optimization for Deep Learning Using New Complete Layer-wise Adaptive Rate Scaling").

    LARS with ``||g||`` in the trust ratio replaced by
    ``s = (1/B) sum_i ||grad_l f_i(w)||``, the mean over the global batch of
    the per-example gradient norms of the tensor (ALGORITHMS.md, "CLARS"):

    .. code-block:: text

        lambda = eta * ||w|| / (s + beta * ||w|| + eps)   if adapt and ||w|| > 0 and s > 0, else 1
        d, v, w as in LARS (LR inside the velocity, momentum correction, LARC clip mode)

    CLARS is meant to be used with a schedule without warmup. Use it from an
    ordinary loop: after each backward pass, hand the optimizer the same
    batch so it can measure the per-example norms, then step::

        loss_fn(model(x), y).backward()
        opt.add_grad_norms(model, loss_fn, x, y)   # this worker's sums
        opt.step()                                  # one allreduce of the sums, then the update

    With ``backward_passes_per_step=k`` call ``add_grad_norms`` after each of
    the ``k`` backward passes; the sums accumulate until ``step()``. Under
    Horovod (initialised, more than one process) ``step()`` averages the sums
    over all workers with one allreduce of ``(#tensors + 1)`` float64 values,
    so every rank must call ``add_grad_norms`` the same number of times.
    ``zero_grad()`` drops norms that no ``step()`` used (a step skipped by
    ``torch.amp.GradScaler``). Alternatively pass ready global means with :meth:`set_grad_norms`.
    Cheaper still, let the optimizer run the training pass itself, so the
    norms reuse its forward pass and activations::

        loss = opt.forward_backward(model, loss_fn, x, y)   # forward, backward, norms
        opt.step()

    Cost: ``estimator="exact"`` computes the norms of ``Linear``,
    ``Conv1d``, ``Conv2d`` and BatchNorm parameters from activations and
    output gradients (one extra forward and one activation-only backward
    pass with ``add_grad_norms``; only the backward with
    ``forward_backward``) and the others with ``torch.func.vmap`` (about B
    single-example backward passes, ``chunk_size`` x those parameters in
    memory); ``"microbatch:k"`` costs ``k`` extra forward/backward passes. BatchNorm layers are held at the batch's
    statistics for the per-example gradients (see
    :mod:`hvd_largebatch.torch_impl.per_example_norms`).

    Note: the paper's estimator and its handling of weight decay are not
    spelled out to the level of code; ALGORITHMS.md fixes our reading (the
    per-example mean replaces ``||g||`` in the LARS denominator, both
    estimators, LARS's zero rule on ``s``).

    Args:
        params, lr, momentum, weight_decay, trust_coefficient, eps, nesterov,
        clip, momentum_correction, exclude_from_weight_decay,
        exclude_from_layer_adaptation, foreach, fused, nonfinite: as :class:`LARS`.
        estimator: ``"exact"`` or ``"microbatch:k"`` (k a positive integer).
        chunk_size: examples whose gradients the exact estimator holds at once.

    Raises:
        ValueError: naming the argument, for any value out of range.

    Example:
        >>> import torch
        >>> from hvd_largebatch.torch_impl import CLARS
        >>> model = torch.nn.Linear(4, 3)
        >>> loss_fn = torch.nn.functional.cross_entropy
        >>> opt = CLARS(model.named_parameters(), lr=1.0, estimator="microbatch:4")
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss_fn(model(x), y).backward()
        >>> opt.add_grad_norms(model, loss_fn, x, y)
        >>> opt.step()
        >>> opt.skipped_steps
        0
    """

    config_type = config.CLARSConfig

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
        fused: bool | None = None,
        nonfinite: str = _D.nonfinite,
        estimator: str = _D.estimator,
        chunk_size: int = _D.chunk_size,
    ) -> None:
        self._pending_sums: torch.Tensor | None = None
        self._pending_count = 0
        self._given_norms: dict[torch.Tensor, torch.Tensor] | None = None
        super().__init__(params, constructor_defaults(locals()), exclude_from_weight_decay, exclude_from_layer_adaptation)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        first = self.param_groups[0]
        for key in ("estimator", "chunk_size"):
            if group[key] != first[key]:
                raise ValueError(f"{key} must be the same for every param group, got {group[key]!r} and {first[key]!r}")

    def _adapted_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p, adapt in zip(group["params"], group[ADAPT_MASK]) if adapt]

    def add_grad_norms(self, model: torch.nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Measures this worker's per-example gradient norms on a batch and adds them to the pending sums.

        Args:
            model: the module whose parameters this optimizer holds.
            loss_fn: ``loss_fn(model(inputs), targets)`` -> mean loss.
            inputs, targets: the batch just used for ``backward()``.
        """
        params = self._adapted_params()
        if not params:
            return
        group = self.param_groups[0]
        sums, count = per_example_grad_norm_sums(
            model, loss_fn, inputs, targets, params, estimator=group["estimator"], chunk_size=group["chunk_size"]
        )
        self._add_pending(sums, count)

    def forward_backward(self, model: torch.nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training pass of one batch with its per-example norms: ``loss_fn(model(inputs), targets).backward()``.

        Gradients accumulate into ``.grad`` exactly as that line would leave
        them (BatchNorm running statistics too); the per-example norm sums of
        the batch are added to the pending sums as :meth:`add_grad_norms`
        does, reusing the forward pass (see
        :func:`~hvd_largebatch.torch_impl.per_example_norms.loss_and_grad_norm_sums`).

        Args:
            model: the module whose parameters this optimizer holds.
            loss_fn: ``loss_fn(model(inputs), targets)`` -> mean loss.
            inputs, targets: the batch.

        Returns:
            The training loss, detached.
        """
        params = self._adapted_params()
        if not params:
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            return loss.detach()
        group = self.param_groups[0]
        loss, sums, count = loss_and_grad_norm_sums(
            model, loss_fn, inputs, targets, params, estimator=group["estimator"], chunk_size=group["chunk_size"]
        )
        self._add_pending(sums, count)
        return loss

    def _add_pending(self, sums: torch.Tensor, count: int) -> None:
        if self._pending_sums is None:
            self._pending_sums, self._pending_count = sums, count
        else:
            self._pending_sums = self._pending_sums + sums.to(self._pending_sums.device)
            self._pending_count += count

    def set_grad_norms(self, norms: Mapping[Any, Any]) -> None:
        """Gives the next step ready global means ``s`` (e.g. from :func:`per_example_grad_norms`).

        The same argument as :meth:`hvd_largebatch.tf.CLARS.set_grad_norms`:
        a mapping from a tensor's full name to its ``s``.

        Args:
            norms: ``{name or tensor: s}`` covering every adapted tensor; names
                are those of ``model.named_parameters()`` when the optimizer was
                built from named parameters.
        """
        if not isinstance(norms, Mapping):
            raise ValueError(f"norms must be a mapping from parameter name or tensor to s, got {type(norms).__name__}")
        by_name = {}
        for group in self.param_groups:
            names = group.get("param_names") or []
            by_name.update(zip(names, group["params"]))
        given: dict[torch.Tensor, torch.Tensor] = {}
        for key, value in norms.items():
            param = by_name.get(key) if isinstance(key, str) else key
            if param is None:
                raise ValueError(f"norms has a key {key!r} that names no parameter of this optimizer")
            value = torch.as_tensor(value, dtype=torch.float64).detach()
            if value.dim() != 0:
                raise ValueError(f"norms[{key!r}] must be a scalar, got shape {tuple(value.shape)}")
            given[param] = value
        self._given_norms = given

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients and, with them, the per-example norms measured for them.

        The pending sums belong to the gradients accumulated since the last
        ``zero_grad()``. When ``step()`` is not called for them (a
        ``torch.amp.GradScaler`` that found an Inf skips it), they must not
        leak into the next step's ``s``.
        """
        super().zero_grad(set_to_none=set_to_none)
        self._given_norms, self._pending_sums, self._pending_count = None, None, 0

    def _resolve_rate_norms(self, work: list[GroupWork]) -> None:
        adapted = self._adapted_params()
        if self._given_norms is not None:
            means = self._given_norms
        elif self._pending_sums is not None:
            from hvd_largebatch.torch_impl.distributed import allreduce_sum_across_workers

            totals = torch.cat([self._pending_sums, self._pending_sums.new_tensor([float(self._pending_count)])])
            totals = allreduce_sum_across_workers(totals, name="hvd_largebatch.clars.grad_norm_sums")
            means = dict(zip(adapted, (totals[:-1] / totals[-1]).unbind()))
        else:
            means = {}
        self._given_norms, self._pending_sums, self._pending_count = None, None, 0
        for group, group_work in zip(self.param_groups, work):
            rate_norms = []
            for position, p, grad_norm in zip(group_work.positions, group_work.params, group_work.grad_norms):
                if not group[ADAPT_MASK][position]:
                    rate_norms.append(grad_norm)
                    continue
                if p not in means:
                    raise RuntimeError(
                        "CLARS.step() needs the per-example gradient norms of every adapted tensor: call "
                        "add_grad_norms(model, loss_fn, inputs, targets) after backward(), or set_grad_norms(...)"
                    )
                rate_norms.append(means[p])
            group_work.rate_norms = rate_norms

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_pending_sums", None)
        self.__dict__.setdefault("_pending_count", 0)
        self.__dict__.setdefault("_given_norms", None)
