"""The update rules of ALGORITHMS.md as plain functions of ``keras.ops`` tensors.

The optimizer classes (``momentum_optimizers``, ``lamb``) only collect
variables, slots and per-tensor switches; the arithmetic lives here, so that
it reads like the math contract. Per-step scalars (trust ratios, local
rates) are computed for all tensors at once on vectors of length
``n_tensors``; the elementwise work is done per tensor.

Sign convention: the momentum slot holds ``m = -v`` (Keras's convention, as
``keras.optimizers.SGD``'s ``momentum`` slot), so the weight step is ``w += m``.

Everything here uses ``keras.ops`` only. :mod:`hvd_largebatch.tf.fused_kernels`
does two of these steps with TensorFlow's single-pass kernels (``fused=True``,
the default); the tests check that both give the oracle's numbers.
"""

from __future__ import annotations

from keras import ops

__all__ = [
    "squared_norm",
    "trust_ratio",
    "lars_local_rates",
    "effective_rates",
    "decayed_gradient",
    "momentum_buffer",
    "nesterov_weight_step",
    "lamb_bias_corrections",
    "lamb_moments",
    "lamb_direction",
]


def squared_norm(x):
    """``||x||^2`` (two passes: square, then sum)."""
    return ops.sum(ops.square(x))


def trust_ratio(num, den):
    """Elementwise ``num / den`` where both are > 0, else 1 (zero-initialised tensors still train).

    The division is made on a safe denominator, so no NaN or Inf can come out
    of the branch that is not taken.
    """
    usable = ops.logical_and(ops.greater(num, 0), ops.greater(den, 0))
    safe_den = ops.where(usable, den, ops.ones_like(den))
    return ops.where(usable, num / safe_den, ops.ones_like(num))


def lars_local_rates(w_norm, g_norm, *, adapt, decay, trust_coefficient, weight_decay, eps):
    """The LARS/CLARS local rate ``lambda`` of each tensor (before the global LR), vectorised.

    Math (ALGORITHMS.md, LARS)::

        lambda_l = eta * ||w_l|| / (||g_l|| + beta_l * ||w_l|| + eps)   if adapt_l, ||w_l|| > 0, ||g_l|| > 0
                 = 1                                                     otherwise

    with ``beta_l = beta`` where weight decay applies to tensor ``l``, else 0.
    Same name, arguments and meaning as
    :func:`hvd_largebatch.torch_impl.momentum_functional.lars_local_rates`.

    Args:
        w_norm: vector of ``||w_l||`` (any value where not adapted).
        g_norm: vector of ``||g_l||`` (LARS) or of the mean per-example
            gradient norms ``s_l`` (CLARS).
        adapt: boolean vector, True where the trust ratio applies.
        decay: boolean vector, True where weight decay applies.
        trust_coefficient: ``eta``.
        weight_decay: ``beta``.
        eps: the constant added to the denominator.

    Returns:
        Vector of ``lambda_l``; exactly 1 where the tensor is not adapted or
        either norm is 0, and never NaN or Inf for finite inputs.
    """
    beta = ops.cast(decay, w_norm.dtype) * weight_decay  # exact: 1 * beta or 0
    usable = ops.logical_and(adapt, ops.logical_and(ops.greater(w_norm, 0), ops.greater(g_norm, 0)))
    den = g_norm + beta * w_norm + eps
    safe_den = ops.where(usable, den, ops.ones_like(den))
    return ops.where(usable, trust_coefficient * w_norm / safe_den, ops.ones_like(w_norm))


def effective_rates(local, *, adapt, lr, clip):
    """The rate multiplying each tensor's decayed gradient: ``gamma * lambda`` (LARS), ``min(gamma, lambda)`` (LARC).

    Tensors excluded from adaptation get ``gamma``. Same name, arguments and
    meaning as :func:`hvd_largebatch.torch_impl.momentum_functional.effective_rates`.
    """
    if clip:
        return ops.where(adapt, ops.minimum(lr, local), lr * ops.ones_like(local))
    return lr * local


def decayed_gradient(g, w, weight_decay):
    """``d = g + beta * w``; ``weight_decay`` is None where decay does not apply."""
    return g if weight_decay is None else g + weight_decay * w


def momentum_buffer(m, d, rate, velocity_scale):
    """The new momentum slot ``m = -v`` of the "LR inside the velocity" step.

    Math (ALGORITHMS.md, SGD and LARS), with ``velocity_scale = momentum * c`` and
    ``c`` the momentum-correction factor of
    :func:`hvd_largebatch.schedules.momentum_correction` (1 without correction)::

        v = momentum * c * v + rate * d       i.e.   m = velocity_scale * m - rate * d
        w = w - v                             i.e.   w = w + m
    """
    return velocity_scale * m - rate * d


def nesterov_weight_step(m, d, rate, momentum):
    """Nesterov's weight increment from the *new* slot: ``w = w - (m_plain * v + rate * d) = w + (mu * m - rate * d)``."""
    return momentum * m - rate * d


def lamb_bias_corrections(step, beta_1, beta_2, eps):
    """Folds LAMB's bias corrections into two scalars.

    With ``t`` the step and the slots holding ``mu`` and ``nu`` (as in
    torch and ALGORITHMS.md), ``mh / (sqrt(nh) + eps) = A * mu / (sqrt(nu) + e)``
    where::

        A = sqrt(1 - b2^t) / (1 - b1^t)
        e = eps * sqrt(1 - b2^t)

    two scalars per step instead of four tensor-sized passes per tensor.

    Returns:
        ``(A, e)``.
    """
    sqrt_1_minus_b2t = ops.sqrt(1.0 - ops.power(beta_2, step))
    return sqrt_1_minus_b2t / (1.0 - ops.power(beta_1, step)), eps * sqrt_1_minus_b2t


def lamb_moments(first, second, g, beta_1, beta_2):
    """LAMB's new moments ``mu = b1 * mu + (1 - b1) * g`` and ``nu = b2 * nu + (1 - b2) * g * g``."""
    return beta_1 * first + (1.0 - beta_1) * g, beta_2 * second + (1.0 - beta_2) * ops.square(g)


def lamb_direction(first, second, w, scaled_eps, decay_over_scale):
    """LAMB's update direction divided by the scalar ``A`` of :func:`lamb_bias_corrections`.

    Math (ALGORITHMS.md, LAMB):
        u / A = mu / (sqrt(nu) + e) + (beta / A) * w     (beta term only if decay)

    ``decay_over_scale`` is ``beta / A``, or None when decay does not apply.
    """
    q = first / (ops.sqrt(second) + scaled_eps)
    if decay_over_scale is None:
        return q
    return q + decay_over_scale * w
