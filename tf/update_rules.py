"""The update rules of ALGORITHMS.md as plain functions of ``keras.ops`` tensors.

The optimizer classes (``momentum_optimizers``, ``lamb``) only collect
variables, slots and per-tensor switches; the arithmetic lives here, so that
it reads like the math contract. Per-step scalars (trust ratios, local
rates) are computed for all tensors at once on vectors of length
``n_tensors``; the elementwise work is done per tensor.

Every function uses only ``keras.ops`` and is traced once inside
``model.fit``'s ``tf.function``.
"""

from __future__ import annotations

from keras import ops

__all__ = [
    "trust_ratio",
    "lars_local_rates",
    "momentum_coefficient",
    "momentum_tensor_update",
    "lamb_bias_corrections",
    "lamb_direction",
]


def trust_ratio(num, den):
    """Elementwise ``num / den`` where both are > 0, else 1 (zero-initialised tensors still train).

    The division is made on a safe denominator, so no NaN or Inf can come out
    of the branch that is not taken.
    """
    usable = ops.logical_and(ops.greater(num, 0), ops.greater(den, 0))
    safe_den = ops.where(usable, den, ops.ones_like(den))
    return ops.where(usable, num / safe_den, ops.ones_like(num))


def lars_local_rates(lr, w_norm, g_norm, *, trust_coefficient, weight_decay, eps, adapt, clip):
    """Per-tensor effective rates of LARS / LARC / CLARS for one step.

    Math (ALGORITHMS.md, LARS):
        lambda_l = eta * ||w_l|| / (||g_l|| + beta_l * ||w_l|| + eps)   if adapt_l, ||w_l|| > 0, ||g_l|| > 0
                 = 1                                                     otherwise
        rate_l   = gamma * lambda_l          (LARS)
                 = min(gamma, lambda_l)      (LARC, ``clip=True``)
                 = gamma                     (tensor excluded from adaptation)

    Args:
        lr: scalar global learning rate ``gamma``.
        w_norm: vector of ``||w_l||`` (any value where not adapted).
        g_norm: vector of ``||g_l||`` (LARS) or of the mean per-example
            gradient norms ``s_l`` (CLARS).
        trust_coefficient: ``eta``.
        weight_decay: vector of ``beta_l``: the weight decay where it applies
            to tensor l, else 0.
        eps: the constant added to the denominator.
        adapt: boolean vector, True where the trust ratio applies.
        clip: LARC mode.

    Returns:
        Vector of the rates that multiply the decayed gradient ``d_l``.
    """
    usable = ops.logical_and(adapt, ops.logical_and(ops.greater(w_norm, 0), ops.greater(g_norm, 0)))
    den = g_norm + weight_decay * w_norm + eps
    safe_den = ops.where(usable, den, ops.ones_like(den))
    local = ops.where(usable, trust_coefficient * w_norm / safe_den, ops.ones_like(w_norm))
    adapted = ops.minimum(lr, local) if clip else lr * local
    return ops.where(adapt, adapted, lr * ops.ones_like(local))


def momentum_coefficient(momentum, lr, prev_lr, correction: bool):
    """The factor applied to the velocity before adding the new step.

    With momentum correction (Goyal et al. 2017, section 2.2) the velocity,
    which holds the LR, is first rescaled by ``gamma_t / gamma_prev``:
    ``v <- m * (gamma_t / gamma_prev) * v + ...``; skipped when
    ``gamma_prev == 0`` (also the value before the first step).
    """
    if not correction:
        return ops.cast(momentum, lr.dtype)
    usable = ops.not_equal(prev_lr, 0)
    safe_prev = ops.where(usable, prev_lr, ops.ones_like(prev_lr))
    return momentum * ops.where(usable, lr / safe_prev, ops.ones_like(lr))


def momentum_tensor_update(w, v, g, rate, velocity_factor, *, momentum, weight_decay, nesterov):
    """One tensor of the "LR inside the velocity" momentum step.

    Math (ALGORITHMS.md, SGD and LARS):
        d = g + beta * w                     (``weight_decay`` is None when decay does not apply)
        v = c * v + rate * d                 (c = ``velocity_factor``: m, times the LR ratio with correction)
        w = w - v                            (Nesterov: w = w - (m * v + rate * d))

    Returns:
        ``(new_velocity, weight_step)``; the caller assigns ``v = new_velocity``
        and ``w = w - weight_step``.
    """
    d = g if weight_decay is None else g + weight_decay * w
    step = rate * d
    new_v = velocity_factor * v + step
    if nesterov:
        return new_v, momentum * new_v + step
    return new_v, new_v


def lamb_bias_corrections(step, beta_1, beta_2, eps):
    """Folds LAMB's bias corrections into two scalars.

    With ``c1 = 1 / (1 - b1^t)`` and ``c2 = 1 / (1 - b2^t)``,
    ``mh / (sqrt(nh) + eps) = a * mu / (sqrt(nu) + e)`` where
    ``a = c1 / sqrt(c2)`` and ``e = eps / sqrt(c2)``: two scalars per step
    instead of two tensor-sized divisions per tensor.

    Returns:
        ``(a, e)``.
    """
    c1 = 1.0 / (1.0 - ops.power(beta_1, step))
    sqrt_c2 = ops.sqrt(1.0 / (1.0 - ops.power(beta_2, step)))
    return c1 / sqrt_c2, eps / sqrt_c2


def lamb_direction(mu, nu, w, scaled_eps, decay_over_scale):
    """LAMB's update direction, divided by the bias-correction scalar ``a``.

    Math (ALGORITHMS.md, LAMB), with ``a``, ``e`` from
    :func:`lamb_bias_corrections`:
        u / a = mu / (sqrt(nu) + e) + (beta / a) * w       (beta term only if decay)

    ``decay_over_scale`` is ``beta / a``, or None when decay does not apply.
    """
    q = mu / (ops.sqrt(nu) + scaled_eps)
    if decay_over_scale is None:
        return q
    return q + decay_over_scale * w
