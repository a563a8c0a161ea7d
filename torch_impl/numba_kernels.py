"""The loops behind ``fused="numba"``, compiled by numba (imported only through :mod:`cpu_kernels`).

Every entry point takes a *table* of tensors: their data addresses (int64,
one row per tensor) and element counts, plus per-tensor scalars as arrays in
the tensors' dtype; it walks the tensors inside one compiled call, so a step
pays one Python-to-machine-code crossing per table, not one per tensor
(which, at 161 tensors, cost as much as two passes over ResNet-50). The
caller guarantees that every address points at a live, contiguous tensor of
the scalars' dtype with the given count (``cpu_kernels.table``).

All arithmetic is in the tensors' dtype (float32 or float64): the per-tensor
scalars arrive in it, and a Python float inside a float32 loop would promote
it to float64 and stop LLVM from vectorising. The fast-math flags allow
reassociation (vectorised sums), contraction (FMA) and reciprocal division,
but not the "no NaN / no Inf" assumptions: a NaN or Inf gradient must reach
the sums that the optimizers' non-finite check reads. ``error_model="numpy"``
lets a division by zero give Inf instead of raising, which would need a
branch per element. ``cache=True`` keeps the machine code on disk, so only
the first process on a machine pays the compile.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

_FAST_MATH = {"reassoc", "contract", "nsz", "arcp"}
_jit = numba.njit(fastmath=_FAST_MATH, error_model="numpy", nogil=True, cache=True)


@intrinsic
def _pointer(typingctx, address, like):
    """The int64 ``address`` as a pointer to elements of ``like``'s dtype (``like``: any 1-D array of it)."""
    pointer_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, like), codegen


@_jit
def _view(addresses, sizes, t, like):
    """Tensor ``t`` of a table as a 1-D array of ``like``'s dtype."""
    return numba.carray(_pointer(addresses[t], like), sizes[t])


@_jit
def sums_of_squares(addresses, sizes, out):
    """``out[t] = sum(x_t**2)``, reading the two halves of each tensor side by side (two memory streams)."""
    for t in range(sizes.shape[0]):
        x = _view(addresses, sizes, t, out)
        half = x.shape[0] // 2
        front = out.dtype.type(0)
        back = out.dtype.type(0)
        for i in range(half):
            front += x[i] * x[i]
            back += x[half + i] * x[half + i]
        if x.shape[0] % 2:
            back += x[-1] * x[-1]
        out[t] = front + back


@_jit
def paired_sums_of_squares(w_addresses, g_addresses, sizes, w_out, g_out):
    """``w_out[t] = sum(w_t**2)`` and ``g_out[t] = sum(g_t**2)``: the halves of both read side by side (four streams)."""
    for t in range(sizes.shape[0]):
        w = _view(w_addresses, sizes, t, w_out)
        g = _view(g_addresses, sizes, t, w_out)
        half = w.shape[0] // 2
        w_front = w_out.dtype.type(0)
        w_back = w_out.dtype.type(0)
        g_front = w_out.dtype.type(0)
        g_back = w_out.dtype.type(0)
        for i in range(half):
            w_front += w[i] * w[i]
            w_back += w[half + i] * w[half + i]
            g_front += g[i] * g[i]
            g_back += g[half + i] * g[half + i]
        if w.shape[0] % 2:
            w_back += w[-1] * w[-1]
            g_back += g[-1] * g[-1]
        w_out[t] = w_front + w_back
        g_out[t] = g_front + g_back


@_jit
def momentum_steps(w_addresses, g_addresses, v_addresses, sizes, scales, rates, rate_decays):
    """Per tensor: ``v = scale*v + rate*g + rate_decay*w; w = w - v`` (``rate_decay = rate*beta_i``)."""
    for t in range(sizes.shape[0]):
        w = _view(w_addresses, sizes, t, rates)
        g = _view(g_addresses, sizes, t, rates)
        v = _view(v_addresses, sizes, t, rates)
        scale, rate, rate_decay = scales[t], rates[t], rate_decays[t]
        for i in range(w.shape[0]):
            velocity = scale * v[i] + rate * g[i] + rate_decay * w[i]
            v[i] = velocity
            w[i] = w[i] - velocity


@_jit
def nesterov_steps(w_addresses, g_addresses, v_addresses, sizes, scales, rates, rate_decays, momentum):
    """Per tensor: ``d = rate*g + rate_decay*w; v = scale*v + d; w = w - (momentum*v + d)``."""
    for t in range(sizes.shape[0]):
        w = _view(w_addresses, sizes, t, rates)
        g = _view(g_addresses, sizes, t, rates)
        v = _view(v_addresses, sizes, t, rates)
        scale, rate, rate_decay, m = scales[t], rates[t], rate_decays[t], momentum[0]
        for i in range(w.shape[0]):
            direction = rate * g[i] + rate_decay * w[i]
            velocity = scale * v[i] + direction
            v[i] = velocity
            w[i] = w[i] - (m * velocity + direction)


@_jit
def lamb_moments(w_addresses, g_addresses, mu_addresses, nu_addresses, sizes, weights, eps, decays, w_out, u_out):
    """Updates each ``mu``, ``nu`` in place; ``w_out[t] = sum(w**2)``, ``u_out[t] = sum(u**2)``.

    ``weights`` holds ``(1 - beta1, beta2, 1 - beta2)``: ``mu = mu + (1 - beta1)*(g - mu)`` (torch's
    ``lerp``), ``nu = beta2*nu + (1 - beta2)*g*g``, ``u = mu/(sqrt(nu) + eps_t) + decay_t*w``. ``u`` is
    not stored: :func:`lamb_apply` computes it again.
    """
    mu_weight, beta2, nu_weight = weights[0], weights[1], weights[2]
    for t in range(sizes.shape[0]):
        w = _view(w_addresses, sizes, t, weights)
        g = _view(g_addresses, sizes, t, weights)
        mu = _view(mu_addresses, sizes, t, weights)
        nu = _view(nu_addresses, sizes, t, weights)
        epsilon, decay = eps[t], decays[t]
        w_sum = weights.dtype.type(0)
        u_sum = weights.dtype.type(0)
        for i in range(w.shape[0]):
            grad = g[i]
            weight = w[i]
            first = mu[i] + mu_weight * (grad - mu[i])
            second = beta2 * nu[i] + nu_weight * grad * grad
            mu[i] = first
            nu[i] = second
            direction = first / (np.sqrt(second) + epsilon) + decay * weight
            w_sum += weight * weight
            u_sum += direction * direction
        w_out[t] = w_sum
        u_out[t] = u_sum


@_jit
def lamb_apply(w_addresses, mu_addresses, nu_addresses, sizes, eps, decays, steps):
    """Per tensor: ``w = w + step_t * (mu/(sqrt(nu) + eps_t) + decay_t*w)`` (``step_t``: sign, LR, trust ratio)."""
    for t in range(sizes.shape[0]):
        w = _view(w_addresses, sizes, t, steps)
        mu = _view(mu_addresses, sizes, t, steps)
        nu = _view(nu_addresses, sizes, t, steps)
        epsilon, decay, step = eps[t], decays[t], steps[t]
        for i in range(w.shape[0]):
            weight = w[i]
            w[i] = weight + step * (mu[i] / (np.sqrt(nu[i]) + epsilon) + decay * weight)
