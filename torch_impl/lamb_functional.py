"""The math of LAMB over lists of tensors (no bookkeeping).

LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training
BERT in 76 minutes", Algorithm 2) as ALGORITHMS.md states it, per tensor,
with ``t`` the tensor's update count starting at 1:

.. code-block:: text

    mu = b1 * mu + (1 - b1) * g          nu = b2 * nu + (1 - b2) * g * g
    mh = mu / (1 - b1^t)                 nh = nu / (1 - b2^t)
    u  = mh / (sqrt(nh) + eps) + beta * w        (beta term if decay)
    r  = ||w|| / ||u||   if adapt and ||w|| > 0 and ||u|| > 0, else 1
    w  = w - gamma * r * u

Note where we differ: the paper's scaling function ``phi(||w||)`` is the
identity here (as in most implementations), bias correction is on (the paper
leaves it optional), and ``eps`` sits outside the square root as in Adam.

:func:`lamb_update` has a single-tensor path, a ``torch._foreach_*`` path
(trust ratios of a chunk in one ``torch.where``, no ``.item()``) and, with
``fused="numba"``, two compiled loops per tensor
(:mod:`hvd_largebatch.torch_impl.cpu_kernels`: the moments with both norms,
then the step) for CPU float32/float64 tensors; tests show them equal in
float64.

float16 and bfloat16 tensors are updated through float32 working copies
with float32 moments (:mod:`hvd_largebatch.torch_impl.mixed_precision`):
``g*g``, ``sqrt(nh)``, ``u``, both norms and ``r`` are float32 and the
weight is rounded to its dtype once per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from hvd_largebatch.torch_impl import cpu_kernels
from hvd_largebatch.torch_impl.mixed_precision import check_state_dtypes, float32_working_copies, write_back
from hvd_largebatch.torch_impl.tensor_lists import cache_sized_chunks, group_by_device_and_dtype, scalar_or_list

__all__ = ["lamb_trust_ratios", "lamb_update"]


def lamb_trust_ratios(w_norms: torch.Tensor, u_norms: torch.Tensor, *, adapt: torch.Tensor) -> torch.Tensor:
    """``r_i = ||w_i|| / ||u_i||`` where adapted and both norms are > 0, else exactly 1."""
    ratio = w_norms / u_norms
    use = adapt & (w_norms > 0) & (u_norms > 0)
    return torch.where(use, ratio, torch.ones_like(ratio))


def lamb_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: Sequence[bool],
    adapt: Sequence[bool],
    foreach: bool = True,
    trust_ratios_out: list[torch.Tensor] | None = None,
    workspace: dict | None = None,
    fused: bool | str = False,
) -> None:
    """Applies one LAMB update in place to ``params``, ``exp_avgs`` (``mu``) and ``exp_avg_sqs`` (``nu``).

    Args:
        params: the tensors ``w``.
        grads: their gradients ``g`` (read only).
        exp_avgs: first moments ``mu`` (float32 for a float16/bfloat16 param,
            else the param's dtype).
        exp_avg_sqs: second moments ``nu`` (same dtype rule).
        steps: per tensor, the update count ``t`` of *this* update (>= 1).
        lr: ``gamma``.
        beta1, beta2: moment decay rates.
        eps: added to ``sqrt(nh)``.
        weight_decay: ``beta``.
        decay: per tensor, whether weight decay applies.
        adapt: per tensor, whether the trust ratio applies.
        foreach: use the ``torch._foreach_*`` path.
        trust_ratios_out: None, or a list with one slot per tensor that
            receives each tensor's ``r`` as a 0-d tensor.
        workspace: foreach path only: a dict the caller keeps between steps;
            the chunk temporaries ``u`` then live in one reused buffer per
            device and dtype (about one chunk, or the largest tensor)
            instead of being allocated every step, which on a CPU costs
            more than the arithmetic (page faults).
        fused: ``"numba"``: the compiled loops for the tensors they serve
            (the others take the path ``foreach`` picks); True or False: no
            torch kernel computes LAMB, so the path ``foreach`` picks.
    """
    count = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == len(decay) == len(adapt) == count):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs, steps, decay and adapt must have the same length")
    if trust_ratios_out is not None and len(trust_ratios_out) != count:
        raise ValueError("trust_ratios_out must have one slot per tensor")
    if count == 0:
        return
    check_state_dtypes(params, exp_avgs, "exp_avgs")
    check_state_dtypes(params, exp_avg_sqs, "exp_avg_sqs")
    targets, params, grads = params, float32_working_copies(params), float32_working_copies(grads)
    _lamb_update(params, grads, exp_avgs, exp_avg_sqs, steps, decay, adapt, foreach, fused, trust_ratios_out, workspace,
                 lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    write_back(targets, params)


def _lamb_update(params, grads, exp_avgs, exp_avg_sqs, steps, decay, adapt, foreach, fused, trust_ratios_out,
                 workspace, *, lr, beta1, beta2, eps, weight_decay) -> None:
    # u = (mu / c1) / (sqrt(nu / c2) + eps) = k * u' with u' = mu / (sqrt(nu) + eps * sqrt(c2)) and
    # k = sqrt(c2) / c1 (c1, c2 the bias corrections). The paths compute u' + (beta / k) * w, whose norm is
    # ||u|| / k, and fold k into the trust ratio and the step: fewer passes over the tensors.
    scales = [math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) for t in steps]
    eps_scaled = [eps * math.sqrt(1.0 - beta2**t) for t in steps]
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    if not foreach and fused != cpu_kernels.NUMBA:
        _single_tensor(params, grads, exp_avgs, exp_avg_sqs, scales, eps_scaled, decay, adapt,
                       trust_ratios_out, **kwargs)
        return
    for bucket in group_by_device_and_dtype(params):
        pick = lambda seq: [seq[i] for i in bucket]  # noqa: E731 - local selector
        columns = (pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(scales), pick(eps_scaled),
                   pick(decay), pick(adapt))
        if fused == cpu_kernels.NUMBA and cpu_kernels.serves(params[bucket[0]]):
            _numba(*columns, trust_ratios_out, bucket, **kwargs)
        elif not foreach:
            _single_tensor_at(*columns, trust_ratios_out, bucket, **kwargs)
        else:
            _multi_tensor(*columns, trust_ratios_out, bucket, workspace, **kwargs)


def _single_tensor(params, grads, exp_avgs, exp_avg_sqs, scales, eps_scaled, decay, adapt,
                   trust_ratios_out, *, lr, beta1, beta2, weight_decay) -> None:
    # The same operations, in the same order, as _multi_tensor on one chunk of one tensor.
    for i, (w, g, mu, nu) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        mu.lerp_(g, 1 - beta1)
        nu.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = nu.sqrt().add_(eps_scaled[i]).reciprocal_().mul_(mu)
        scale = torch.tensor([scales[i]], dtype=w.dtype, device=w.device)
        if decay[i] and weight_decay != 0:
            u.addcmul_(w, (weight_decay / scale)[0])
        ratio = lamb_trust_ratios(
            torch.linalg.vector_norm(w).reshape(1),
            torch.linalg.vector_norm(u).reshape(1) * scale,
            adapt=torch.tensor([bool(adapt[i])], device=w.device),
        )
        w.addcmul_(u, (ratio * scale * -lr)[0])
        if trust_ratios_out is not None:
            trust_ratios_out[i] = ratio[0]


def _single_tensor_at(params, grads, exp_avgs, exp_avg_sqs, scales, eps_scaled, decay, adapt, trust_ratios_out,
                      positions, **kwargs) -> None:
    """:func:`_single_tensor` on some tensors, whose trust ratios go to ``positions`` of ``trust_ratios_out``."""
    out = None if trust_ratios_out is None else [None] * len(params)
    _single_tensor(params, grads, exp_avgs, exp_avg_sqs, scales, eps_scaled, decay, adapt, out, **kwargs)
    for position, ratio in zip(positions, out or []):
        trust_ratios_out[position] = ratio


def _numba(params, grads, exp_avgs, exp_avg_sqs, scales, eps_scaled, decay, adapt, trust_ratios_out, positions,
           *, lr, beta1, beta2, weight_decay) -> None:
    # One CPU float32/float64 bucket: the moments and both norms of every tensor in one compiled call, the
    # trust ratios in one expression, then the steps in a second call.
    kernels = cpu_kernels.require()
    device, dtype = params[0].device, params[0].dtype
    served = [i for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)) if cpu_kernels.serves(*tensors)]
    scalars = lambda values: np.array(values, dtype=cpu_kernels.numpy_dtype(dtype))  # noqa: E731
    w_addresses, sizes = cpu_kernels.table([params[i] for i in served])
    mu_addresses = cpu_kernels.addresses([exp_avgs[i] for i in served])
    nu_addresses = cpu_kernels.addresses([exp_avg_sqs[i] for i in served])
    eps = scalars([eps_scaled[i] for i in served])
    decays = scalars([weight_decay / scales[i] if decay[i] else 0.0 for i in served])
    w_sums, u_sums = (np.zeros(len(served), dtype=cpu_kernels.numpy_dtype(dtype)) for _ in range(2))
    kernels.lamb_moments(w_addresses, cpu_kernels.addresses([grads[i] for i in served]), mu_addresses, nu_addresses,
                         sizes, scalars([1 - beta1, beta2, 1 - beta2]), eps, decays, w_sums, u_sums)
    scale = torch.tensor([scales[i] for i in served], dtype=dtype, device=device)
    ratios = lamb_trust_ratios(torch.from_numpy(w_sums).sqrt_(), torch.from_numpy(u_sums).sqrt_() * scale,
                               adapt=torch.tensor([bool(adapt[i]) for i in served], device=device))
    kernels.lamb_apply(w_addresses, mu_addresses, nu_addresses, sizes, eps, decays,
                       (ratios * scale * -lr).numpy().astype(cpu_kernels.numpy_dtype(dtype)))
    if trust_ratios_out is not None:
        for i, ratio in zip(served, ratios.unbind()):
            trust_ratios_out[positions[i]] = ratio
    rest = sorted(set(range(len(params))) - set(served))
    if rest:  # tensors laid out differently from their gradient or moments: the single-tensor rule
        pick = lambda seq: [seq[i] for i in rest]  # noqa: E731 - local selector
        _single_tensor_at(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(scales),
                          pick(eps_scaled), pick(decay), pick(adapt), trust_ratios_out, pick(positions),
                          lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)


def _scratch(workspace: dict | None, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors shaped like ``like`` in the reused workspace buffer (uninitialised)."""
    numels = [t.numel() for t in like]
    total = sum(numels)
    key = (like[0].device, like[0].dtype)
    buffer = workspace.get(key)
    if buffer is None or buffer.numel() < total:
        buffer = workspace[key] = torch.empty(total, device=like[0].device, dtype=like[0].dtype)
    return [view.view(t.shape) for view, t in zip(buffer[:total].split(numels), like)]


def _multi_tensor(params, grads, exp_avgs, exp_avg_sqs, scales, eps_scaled, decay, adapt,
                  trust_ratios_out, positions, workspace, *, lr, beta1, beta2, weight_decay) -> None:
    device, dtype = params[0].device, params[0].dtype
    adapt_all = torch.tensor(list(adapt), dtype=torch.bool, device=device)
    scale_all = torch.tensor(scales, dtype=dtype, device=device)
    for chunk in cache_sized_chunks(params):
        w, g, mu, nu = list(params[chunk]), list(grads[chunk]), list(exp_avgs[chunk]), list(exp_avg_sqs[chunk])
        scale = scale_all[chunk]
        torch._foreach_lerp_(mu, g, 1 - beta1)
        torch._foreach_mul_(nu, beta2)
        torch._foreach_addcmul_(nu, g, g, value=1 - beta2)
        if workspace is None:
            u = torch._foreach_sqrt(nu)
        else:
            u = _scratch(workspace, nu)
            torch._foreach_copy_(u, nu)
            torch._foreach_sqrt_(u)
        torch._foreach_add_(u, scalar_or_list(eps_scaled[chunk]))  # u = sqrt(nu) + eps'
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, mu)  # u = mu / (sqrt(nu) + eps'), in place
        decayed = [i for i, applies in enumerate(decay[chunk]) if applies] if weight_decay != 0 else []
        if decayed:
            coefficients = (weight_decay / scale).unbind()
            torch._foreach_addcmul_([u[i] for i in decayed], [w[i] for i in decayed], [coefficients[i] for i in decayed])
        ratios = lamb_trust_ratios(
            torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(u)) * scale, adapt=adapt_all[chunk]
        )
        torch._foreach_addcmul_(w, u, list((ratios * scale * -lr).unbind()))
        if trust_ratios_out is not None:
            for position, ratio in zip(positions[chunk], ratios.unbind()):
                trust_ratios_out[position] = ratio
