"""The float64 NumPy reference of ConAdv that the torch and Keras ConAdv tests both compare against.

A linear softmax model ``logits = x W^T + b`` trained with plain SGD on a few
random batches; the attack is untargeted with no random start, so every step
is deterministic. This module imports neither torch nor TensorFlow.
"""

from __future__ import annotations

import numpy as np

DIM, CLASSES, BATCH, STEPS, LR = 6, 3, 8, 8, 0.5
#: The attack both frameworks' exactness tests use.
ATTACK = dict(epsilon=0.3, step_size=0.2, attack_iters=2, adv_weight=0.7, input_range=(-1.0, 1.0))


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ce_grads(W, b, x, y):
    """Gradients of mean CE(x W^T + b, y) with respect to x, W and b."""
    residual = softmax(x @ W.T + b)
    residual[np.arange(len(y)), y] -= 1.0
    residual /= len(y)
    return residual @ W, residual.T @ x, residual.sum(axis=0)


def reference_attack(W, b, x, y, eps, alpha, iters, input_range):
    """``iters`` signed-gradient ascent steps from ``x``, clipped to the epsilon ball and ``input_range``."""
    x_adv = x.copy()
    for _ in range(iters):
        gx, _, _ = ce_grads(W, b, x_adv, y)
        x_adv = np.clip(x_adv + alpha * np.sign(gx), x - eps, x + eps)
        if input_range is not None:
            x_adv = np.clip(x_adv, *input_range)
    return x_adv


def reference_conadv(W, b, batches, tau, eps, alpha, iters, adv_weight, input_range, average=False):
    """``(weights after each step, adversarial inputs of each step)``: batch t attacked from theta_{t-tau}.

    ``theta_t`` is used for ``t < tau``; ``average`` divides the loss by ``1 + adv_weight``.
    """
    scale = 1 / (1 + adv_weight) if average else 1.0
    thetas, adversarial = [(W.copy(), b.copy())], []
    for t, (x, y) in enumerate(batches):
        W_att, b_att = thetas[t - tau] if t >= tau else thetas[t]
        x_adv = reference_attack(W_att, b_att, x, y, eps, alpha, iters, input_range)
        _, gW_clean, gb_clean = ce_grads(W, b, x, y)
        _, gW_adv, gb_adv = ce_grads(W, b, x_adv, y)
        W = W - LR * scale * (gW_clean + adv_weight * gW_adv)
        b = b - LR * scale * (gb_clean + adv_weight * gb_adv)
        thetas.append((W.copy(), b.copy()))
        adversarial.append(x_adv)
    return thetas, adversarial


def problem(seed=0, steps=STEPS):
    """``(W, b, batches)``: random initial weights and ``steps`` batches of inputs in [-1, 1]."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(CLASSES, DIM))
    b = rng.normal(size=CLASSES) * 0.1
    batches = [(rng.uniform(-1, 1, size=(BATCH, DIM)), rng.integers(0, CLASSES, size=BATCH)) for _ in range(steps)]
    return W, b, batches
