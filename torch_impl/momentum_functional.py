"""The math of momentum SGD, LARS, LARC and CLARS over lists of tensors (no bookkeeping).

Every update here has the learning rate inside the velocity (ALGORITHMS.md,
"SGD with momentum" and "LARS"). For tensor ``i`` with local rate
``lambda_i`` (1 for plain SGD and for tensors excluded from adaptation):

.. code-block:: text

    d_i = g_i + beta * w_i                       (if decay_i, else g_i)
    lambda_i = eta * ||w_i|| / (n_i + beta_i * ||w_i|| + eps)
                                                 if adapt_i and ||w_i|| > 0 and n_i > 0, else 1
    rate_i = gamma * lambda_i                    (LARS)
           = min(gamma, lambda_i) if adapt_i     (LARC, clip=True), gamma otherwise
    v_i = m * c_i * v_i + rate_i * d_i           (c_i = gamma / gamma_prev: momentum correction)
    w_i = w_i - v_i                              (Nesterov: w_i - (m * v_i + rate_i * d_i))

where ``n_i`` is ``||g_i||`` for LARS and the mean per-example gradient norm
``s_i`` for CLARS, and ``beta_i`` is ``beta`` when decay applies to tensor
``i`` and 0 otherwise. References: You, Gitman, Ginsburg 2017 (LARS,
Algorithm 1); NVIDIA apex ``LARC`` (clip mode); Huo, Gu, Huang 2021 (CLARS);
Goyal et al. 2017, section 2.2 (momentum correction).

:func:`momentum_update` has two paths that tests show equal in float64: a
single-tensor loop and a ``torch._foreach_*`` path that computes the local
rates of a whole chunk as one vectorised expression (``torch.where``),
without ``.item()`` and without a Python loop over tensors in the math.
Both apply the velocity update as ``v = (m*c)*v + rate*g + (rate*beta)*w``,
in place, so no temporary ``d`` is allocated (on a CPU an allocation per
step costs more than the extra in-cache pass); the result differs from the
oracle's ``rate*(g + beta*w)`` only by rounding.

With ``fused=True`` the update of each tensor is one pass of torch's fused
SGD kernel (``torch._fused_sgd_``: read ``w``, ``g``, ``v``, write ``v``,
``w``) where that kernel computes exactly this rule: on a CPU, for float32
and float64 tensors laid out alike, without Nesterov and with ``m*c != 0``.
Its arguments are ``momentum = m*c``, ``weight_decay = beta`` (decayed
tensors, else 0), ``dampening = 1 - rate``, ``lr = 1``, so it computes
``v = (m*c)*v + (1 - (1 - rate)) * (g + beta*w)`` and ``w = w - v``; the
rate then carries an absolute rounding error of at most 2**-53 (relative
``1.1e-16 / rate``), the only difference from the foreach path besides the
order of rounding. Tensors the kernel does not serve take the foreach (or
single-tensor) path. The local rates of all tensors are one vectorised
expression, read back as Python floats (a CPU tensor: no device sync).

With ``fused="numba"`` each tensor the compiled loops of
:mod:`hvd_largebatch.torch_impl.cpu_kernels` serve (CPU, float32/float64,
contiguous) is updated in one loop, Nesterov and ``m*c == 0`` included, with
the local rates computed as on the fused path; the others take the path
``fused=True`` would take.

float16 and bfloat16 tensors are updated through float32 working copies
with float32 velocities (:mod:`hvd_largebatch.torch_impl.mixed_precision`):
the norms, rates and the velocity are float32 and the weight is rounded to
its dtype once per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hvd_largebatch.torch_impl import cpu_kernels
from hvd_largebatch.torch_impl.mixed_precision import check_state_dtypes, float32_working_copies, write_back
from hvd_largebatch.torch_impl.tensor_lists import (
    cache_sized_chunks,
    group_by_device_and_dtype,
    scalar_or_list,
    tensor_norms,
)

__all__ = ["lars_local_rates", "effective_rates", "momentum_update"]


def lars_local_rates(
    w_norms: torch.Tensor,
    grad_norms: torch.Tensor,
    *,
    adapt: torch.Tensor,
    decay: torch.Tensor,
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
) -> torch.Tensor:
    """The LARS/CLARS local rate ``lambda`` of each tensor (before the global LR), vectorised.

    Same name, arguments and meaning as :func:`hvd_largebatch.tf.update_rules.lars_local_rates`.

    Args:
        w_norms: ``||w_i||``, 1-D.
        grad_norms: ``||g_i||`` (LARS) or ``s_i`` (CLARS), 1-D, same length.
        adapt: bool, whether the trust ratio applies to tensor ``i``.
        decay: bool, whether weight decay applies (adds ``beta * ||w_i||``
            to the denominator).
        trust_coefficient: ``eta``.
        weight_decay: ``beta``.
        eps: added to the denominator.

    Returns:
        ``lambda_i``; exactly 1 where the tensor is not adapted or either
        norm is 0, so zero-initialised tensors still train and no NaN or Inf
        comes out for finite inputs.
    """
    beta = decay.to(w_norms.dtype) * weight_decay  # exact: 1 * beta or 0, in the norms' dtype
    ratio = trust_coefficient * w_norms / (grad_norms + beta * w_norms + eps)
    use = adapt & (w_norms > 0) & (grad_norms > 0)
    return torch.where(use, ratio, torch.ones_like(ratio))


def effective_rates(local: torch.Tensor, *, adapt: torch.Tensor, lr: float, clip: bool) -> torch.Tensor:
    """``gamma * lambda_i`` (LARS) or ``min(gamma, lambda_i)`` for adapted tensors (LARC, ``clip=True``).

    Same name, arguments and meaning as :func:`hvd_largebatch.tf.update_rules.effective_rates`.
    """
    if clip:
        return torch.where(adapt, torch.clamp(local, max=lr), torch.full_like(local, lr))
    return local * lr


def momentum_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    velocities: Sequence[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    decay: Sequence[bool],
    velocity_corrections: Sequence[float],
    nesterov: bool = False,
    adapt: Sequence[bool] | None = None,
    grad_norms: Sequence[torch.Tensor] | None = None,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    clip: bool = False,
    foreach: bool = True,
    local_rates_out: list[torch.Tensor] | None = None,
    fused: bool | str = False,
    weight_norms: Sequence[torch.Tensor] | None = None,
) -> None:
    """Applies one SGD/LARS/LARC/CLARS update in place to ``params`` and ``velocities``.

    Args:
        params: the tensors ``w``, updated in place.
        grads: their gradients ``g`` (read only).
        velocities: the velocities ``v``, updated in place; float32 for a
            float16/bfloat16 param, else the param's dtype.
        lr: the global rate ``gamma`` of this step.
        momentum: ``m``.
        weight_decay: ``beta``.
        decay: per tensor, whether weight decay applies.
        velocity_corrections: per tensor, the momentum-correction factor
            ``c_i = gamma / gamma_prev`` of :func:`hvd_largebatch.schedules.momentum_correction`
            (1.0 when the correction is off or there is no previous rate).
        nesterov: Nesterov momentum.
        adapt: per tensor, whether the trust ratio applies; None for plain
            momentum SGD (no norms are computed).
        grad_norms: per tensor 0-d tensors ``n_i`` (``||g_i||`` for LARS,
            ``s_i`` for CLARS), on the tensor's device. Computed from
            ``grads`` when None.
        trust_coefficient: ``eta``.
        eps: denominator constant.
        clip: LARC mode.
        foreach: use the ``torch._foreach_*`` path.
        local_rates_out: None, or a list with one slot per tensor that
            receives each tensor's local rate ``lambda`` as a 0-d tensor (for
            trust-ratio statistics; costs nothing when None).
        fused: True: torch's fused SGD kernel for the tensors it serves (see
            the module doc); ``"numba"``: the compiled loops of
            :mod:`~hvd_largebatch.torch_impl.cpu_kernels` for the tensors they
            serve, torch's fused kernel next; the others take the path
            ``foreach`` picks.
        weight_norms: per tensor 0-d tensors ``||w_i||`` already computed
            (the optimizers' ``fused="numba"`` check reads them with
            ``||g||``); computed here when None.
    """
    if not params:
        return
    count = len(params)
    if not (len(grads) == len(velocities) == len(decay) == len(velocity_corrections) == count):
        raise ValueError("params, grads, velocities, decay and velocity_corrections must have the same length")
    if adapt is not None and len(adapt) != count:
        raise ValueError("adapt must have one entry per tensor")
    if local_rates_out is not None and len(local_rates_out) != count:
        raise ValueError("local_rates_out must have one slot per tensor")
    check_state_dtypes(params, velocities, "velocities")
    targets, params, grads = params, float32_working_copies(params), float32_working_copies(grads)
    if adapt is not None and grad_norms is None:
        grad_norms = tensor_norms(grads, foreach)
    _momentum_update(params, grads, velocities, decay, velocity_corrections, adapt, grad_norms, weight_norms,
                     local_rates_out, foreach, fused, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                     trust_coefficient=trust_coefficient, eps=eps, clip=clip)
    write_back(targets, params)


def _momentum_update(params, grads, velocities, decay, velocity_corrections, adapt, grad_norms, weight_norms,
                     local_rates_out, foreach, fused, *, lr, momentum, weight_decay, nesterov, trust_coefficient, eps, clip) -> None:
    kwargs = dict(
        lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
        trust_coefficient=trust_coefficient, eps=eps, clip=clip,
    )
    if not foreach and not fused:
        _single_tensor(params, grads, velocities, decay, velocity_corrections, adapt, grad_norms,
                       local_rates_out, **kwargs)
        return
    for bucket in group_by_device_and_dtype(params):
        pick = lambda seq: [seq[i] for i in bucket]  # noqa: E731 - local selector
        args = (
            pick(params), pick(grads), pick(velocities), pick(decay), pick(velocity_corrections),
            None if adapt is None else pick(adapt), None if grad_norms is None else pick(grad_norms),
            local_rates_out, bucket,
        )
        if fused == cpu_kernels.NUMBA and cpu_kernels.serves(params[bucket[0]]):
            _numba(*args, None if weight_norms is None else pick(weight_norms), **kwargs)
        elif fused and _fused_kernel_serves(params[bucket[0]], nesterov):
            _fused(*args, foreach=foreach, **kwargs)
        elif foreach:
            _multi_tensor(*args, **kwargs)
        else:
            _single_tensor_at(*args, **kwargs)


def _single_tensor_at(params, grads, velocities, decay, corrections, adapt, grad_norms, local_rates_out, positions,
                      **kwargs) -> None:
    """:func:`_single_tensor` on one bucket, whose local rates go to ``positions`` of ``local_rates_out``."""
    out = None if local_rates_out is None else [None] * len(params)
    _single_tensor(params, grads, velocities, decay, corrections, adapt, grad_norms, out, **kwargs)
    for position, rate in zip(positions, out or []):
        local_rates_out[position] = rate


def _fused_kernel_serves(example: torch.Tensor, nesterov: bool) -> bool:
    """Whether torch's fused SGD kernel computes this package's rule for a bucket like ``example``."""
    return (
        not nesterov
        and example.device.type == "cpu"
        and example.dtype in (torch.float32, torch.float64)
        and hasattr(torch, "_fused_sgd_")
    )


def _rates_as_floats(params, decay, adapt, grad_norms, weight_norms, local_rates_out, positions, *, lr, weight_decay,
                     trust_coefficient, eps, clip) -> list[float]:
    """The effective rate of every tensor of a CPU bucket as Python floats (``lr`` where there is no trust ratio)."""
    if adapt is None:
        return [float(lr)] * len(params)
    device, dtype = params[0].device, params[0].dtype
    if weight_norms is None:
        weight_norms = torch._foreach_norm(params)
    adapt_all = torch.tensor(list(adapt), dtype=torch.bool, device=device)
    like = lambda n: n if n.dtype == dtype and n.device == device else n.to(device=device, dtype=dtype)  # noqa: E731
    local = lars_local_rates(
        torch.stack([like(n) for n in weight_norms]),
        torch.stack([like(n) for n in grad_norms]),
        adapt=adapt_all,
        decay=torch.tensor(list(decay), dtype=torch.bool, device=device),
        trust_coefficient=trust_coefficient,
        weight_decay=weight_decay,
        eps=eps,
    )
    if local_rates_out is not None:
        for position, rate in zip(positions, local.unbind()):
            local_rates_out[position] = rate
    return effective_rates(local, adapt=adapt_all, lr=lr, clip=clip).tolist()


def _numba(params, grads, velocities, decay, corrections, adapt, grad_norms, local_rates_out, positions, weight_norms,
           *, lr, momentum, weight_decay, nesterov, trust_coefficient, eps, clip) -> None:
    # One CPU float32/float64 bucket: rates first (as on the fused path), then one compiled call for all tensors.
    kernels = cpu_kernels.require()
    rates = _rates_as_floats(params, decay, adapt, grad_norms, weight_norms, local_rates_out, positions, lr=lr,
                             weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, clip=clip)
    served = [i for i, tensors in enumerate(zip(params, grads, velocities)) if cpu_kernels.serves(*tensors)]
    scalars = lambda values: np.array(values, dtype=cpu_kernels.numpy_dtype(params[0].dtype))  # noqa: E731
    w_addresses, sizes = cpu_kernels.table([params[i] for i in served])
    tables = (w_addresses, cpu_kernels.addresses([grads[i] for i in served]),
              cpu_kernels.addresses([velocities[i] for i in served]), sizes)
    per_tensor = (
        scalars([momentum * corrections[i] for i in served]),
        scalars([rates[i] for i in served]),
        scalars([rates[i] * weight_decay if decay[i] else 0.0 for i in served]),
    )
    if nesterov:
        kernels.nesterov_steps(*tables, *per_tensor, scalars([momentum]))
    else:
        kernels.momentum_steps(*tables, *per_tensor)
    rest = sorted(set(range(len(params))) - set(served))
    if rest:  # tensors laid out differently from their gradient or velocity: the single-tensor rule
        pick = lambda seq: [seq[i] for i in rest]  # noqa: E731 - local selector
        _single_tensor(pick(params), pick(grads), pick(velocities), pick(decay), pick(corrections),
                       None if adapt is None else pick(adapt), None if grad_norms is None else pick(grad_norms),
                       None, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                       trust_coefficient=trust_coefficient, eps=eps, clip=clip)


def _fused(params, grads, velocities, decay, corrections, adapt, grad_norms, local_rates_out, positions, *,
           foreach, lr, momentum, weight_decay, nesterov, trust_coefficient, eps, clip) -> None:
    # One bucket (CPU, float32/float64, no Nesterov). Rates of every tensor first, as Python floats.
    rates = _rates_as_floats(params, decay, adapt, grad_norms, None, local_rates_out, positions, lr=lr,
                             weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, clip=clip)
    # Tensors sharing (m*c, beta_i, rate) go to the kernel in one call; the rest take the other path.
    calls: dict[tuple[float, float, float], list[int]] = {}
    rest: list[int] = []
    for i, (w, g, v) in enumerate(zip(params, grads, velocities)):
        scale = momentum * corrections[i]
        if scale != 0 and w.is_contiguous() and g.is_contiguous() and v.is_contiguous():
            calls.setdefault((scale, weight_decay if decay[i] else 0.0, rates[i]), []).append(i)
        else:
            rest.append(i)
    for (scale, beta, rate), members in calls.items():
        torch._fused_sgd_(
            [params[i] for i in members], [grads[i] for i in members], [velocities[i] for i in members],
            weight_decay=beta, momentum=scale, lr=1.0, dampening=1.0 - rate,
            nesterov=False, maximize=False, is_first_step=False,
        )
    for i in rest:  # m*c == 0 (momentum 0, or an LR that dropped to 0), or tensors laid out differently
        w, g, v = params[i], grads[i], velocities[i]
        v.mul_(momentum * corrections[i]).add_(g, alpha=rates[i])
        if decay[i] and weight_decay != 0:
            v.add_(w, alpha=rates[i] * weight_decay)
        w.sub_(v)


def _single_tensor(params, grads, velocities, decay, corrections, adapt, grad_norms, local_rates_out, *,
                   lr, momentum, weight_decay, nesterov, trust_coefficient, eps, clip) -> None:
    # The same operations, in the same order, as _multi_tensor on one chunk of one tensor.
    for i, (w, g, v) in enumerate(zip(params, grads, velocities)):
        decays = bool(decay[i]) and weight_decay != 0
        if adapt is None:
            v.mul_(momentum * corrections[i]).add_(g, alpha=lr)
            if decays:
                v.add_(w, alpha=lr * weight_decay)
            if nesterov:
                if decays:
                    w.mul_(1 - lr * weight_decay)
                w.add_(v, alpha=-momentum).add_(g, alpha=-lr)
            else:
                w.sub_(v)
            continue
        adapt_i = torch.tensor([adapt[i]], device=w.device)
        local = lars_local_rates(
            torch.linalg.vector_norm(w).reshape(1),
            grad_norms[i].to(device=w.device, dtype=w.dtype).reshape(1),
            adapt=adapt_i,
            decay=torch.tensor([bool(decay[i])], device=w.device),
            trust_coefficient=trust_coefficient,
            weight_decay=weight_decay,
            eps=eps,
        )
        rates = effective_rates(local, adapt=adapt_i, lr=lr, clip=clip)
        v.mul_(momentum * corrections[i]).addcmul_(g, rates[0])
        if decays:
            v.addcmul_(w, (rates * weight_decay)[0])
        if nesterov:
            if decays:
                w.mul_((1 - rates * weight_decay)[0])
            w.add_(v, alpha=-momentum).addcmul_(g, (-rates)[0])
        else:
            w.sub_(v)
        if local_rates_out is not None:
            local_rates_out[i] = local[0]


def _multi_tensor(params, grads, velocities, decay, corrections, adapt, grad_norms, local_rates_out, positions, *,
                  lr, momentum, weight_decay, nesterov, trust_coefficient, eps, clip) -> None:
    # Per chunk: v = m*c*v + rate*g (+ rate*beta*w), then w -= v. No temporary d = g + beta*w is
    # allocated: on a CPU the extra allocation and pass cost more than the second addcmul.
    device = params[0].device
    scales = [momentum * c for c in corrections]
    if adapt is not None:
        adapt_all = torch.tensor(list(adapt), dtype=torch.bool, device=device)
        decay_all = torch.tensor(list(decay), dtype=torch.bool, device=device)
        norms_all = torch.stack([n.to(device=device, dtype=params[0].dtype) for n in grad_norms])
    for chunk in cache_sized_chunks(params):
        w, g, v = list(params[chunk]), list(grads[chunk]), list(velocities[chunk])
        decayed = [i for i, applies in enumerate(decay[chunk]) if applies] if weight_decay != 0 else []
        w_decayed, v_decayed = [w[i] for i in decayed], [v[i] for i in decayed]
        torch._foreach_mul_(v, scalar_or_list(scales[chunk]))
        if adapt is None:
            torch._foreach_add_(v, g, alpha=lr)
            if decayed:
                torch._foreach_add_(v_decayed, w_decayed, alpha=lr * weight_decay)
            if nesterov:
                if decayed:
                    torch._foreach_mul_(w_decayed, 1 - lr * weight_decay)
                torch._foreach_add_(w, v, alpha=-momentum)
                torch._foreach_add_(w, g, alpha=-lr)
            else:
                torch._foreach_sub_(w, v)
            continue
        local = lars_local_rates(
            torch.stack(torch._foreach_norm(w)),
            norms_all[chunk],
            adapt=adapt_all[chunk],
            decay=decay_all[chunk],
            trust_coefficient=trust_coefficient,
            weight_decay=weight_decay,
            eps=eps,
        )
        rates = effective_rates(local, adapt=adapt_all[chunk], lr=lr, clip=clip)
        torch._foreach_addcmul_(v, g, list(rates.unbind()))
        if decayed:
            decay_rates = (rates * weight_decay).unbind()
            torch._foreach_addcmul_(v_decayed, w_decayed, [decay_rates[i] for i in decayed])
        if nesterov:
            if decayed:
                shrink = (1 - rates * weight_decay).unbind()
                torch._foreach_mul_(w_decayed, [shrink[i] for i in decayed])
            torch._foreach_add_(w, v, alpha=-momentum)
            torch._foreach_addcmul_(w, g, list((-rates).unbind()))
        else:
            torch._foreach_sub_(w, v)
        if local_rates_out is not None:
            for position, rate in zip(positions[chunk], local.unbind()):
                local_rates_out[position] = rate
