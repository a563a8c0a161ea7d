"""The float64 NumPy oracle of every update rule in ALGORITHMS.md.

This module is the executable form of the math contract. It is written for
clarity, one tensor at a time, never for speed: the PyTorch and Keras
optimizers are tested against it (float64: relative error <= 1e-10 after 20
steps).

Example:
    >>> import numpy as np
    >>> from hvd_largebatch import config, reference
    >>> opt = reference.ReferenceOptimizer(config.optimizer_config("lars"), decay=[True], adapt=[True])
    >>> w = [np.ones((2, 2))]
    >>> w = opt.step(w, [np.full((2, 2), 0.5)], lr=0.1)
    >>> float(np.round(w[0][0, 0], 8))  # lambda = 0.001 * 2 / 1 = 0.002; step 0.1 * 0.002 * 0.5
    0.9999
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hvd_largebatch import config as _config
from hvd_largebatch.schedules import momentum_correction

__all__ = [
    "trust_ratio",
    "lars_local_lr",
    "per_example_norm_mean",
    "sgd_update",
    "lars_update",
    "lamb_update",
    "ReferenceOptimizer",
]


def trust_ratio(num: float, den: float) -> float:
    """``num / den`` when both are > 0, else 1 (zero-initialised tensors still train)."""
    return num / den if num > 0 and den > 0 else 1.0


def lars_local_lr(
    w: np.ndarray,
    g_norm: float,
    *,
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
    decay: bool,
    adapt: bool,
) -> float:
    """The LARS/CLARS local rate ``lambda`` of one tensor.

    ``g_norm`` is ``||g||`` for LARS and the mean per-example gradient norm
    ``s`` for CLARS. The zero tests are on ``||w||`` and on ``g_norm``.
    """
    if not adapt:
        return 1.0
    w_norm = float(np.linalg.norm(w))
    if w_norm > 0 and g_norm > 0:
        beta = weight_decay if decay else 0.0
        return trust_coefficient * w_norm / (g_norm + beta * w_norm + eps)
    return 1.0


def per_example_norm_mean(per_example_grads: np.ndarray) -> float:
    """``s = (1/B) sum_i ||g_i||`` for per-example gradients stacked on axis 0."""
    flat = np.asarray(per_example_grads, dtype=np.float64).reshape(len(per_example_grads), -1)
    return float(np.linalg.norm(flat, axis=1).mean())


def _momentum_step(w, v, g, rate, *, momentum, weight_decay, nesterov, decay):
    """One 'LR inside the velocity' step: returns the new (w, v) for effective rate ``rate``."""
    d = g + weight_decay * w if decay else g
    v = momentum * v + rate * d
    step = momentum * v + rate * d if nesterov else v
    return w - step, v


def sgd_update(w, v, g, *, lr, momentum, weight_decay, nesterov, decay):
    """SGD with momentum, LR inside the velocity. Returns ``(w, v)``."""
    return _momentum_step(
        w, v, g, lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, decay=decay
    )


def lars_update(
    w, v, g, *, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, clip, decay, adapt, g_norm=None
):
    """LARS (or LARC when ``clip``; CLARS when ``g_norm`` is the per-example mean). Returns ``(w, v)``."""
    if g_norm is None:
        g_norm = float(np.linalg.norm(g))
    local = lars_local_lr(
        w, g_norm, trust_coefficient=trust_coefficient, weight_decay=weight_decay, eps=eps, decay=decay, adapt=adapt
    )
    if not adapt:
        rate = lr
    elif clip:
        rate = min(lr, local)
    else:
        rate = lr * local
    return _momentum_step(
        w, v, g, rate, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, decay=decay
    )


def lamb_update(w, mu, nu, g, *, step, lr, beta1, beta2, eps, weight_decay, decay, adapt):
    """LAMB with bias correction; ``step`` counts from 1. Returns ``(w, mu, nu)``."""
    mu = beta1 * mu + (1 - beta1) * g
    nu = beta2 * nu + (1 - beta2) * g * g
    m_hat = mu / (1 - beta1**step)
    n_hat = nu / (1 - beta2**step)
    u = m_hat / (np.sqrt(n_hat) + eps)
    if decay:
        u = u + weight_decay * w
    r = trust_ratio(float(np.linalg.norm(w)), float(np.linalg.norm(u))) if adapt else 1.0
    return w - lr * r * u, mu, nu


class ReferenceOptimizer:
    """A stateful float64 oracle over a list of tensors.

    Args:
        cfg: a record from :func:`hvd_largebatch.config.optimizer_config`.
        decay: per tensor, whether weight decay applies.
        adapt: per tensor, whether the trust ratio applies (ignored by SGD).

    State (``self.state``): ``velocity`` (SGD/LARS/CLARS) or ``mu``/``nu``
    (LAMB), ``step`` (applied updates), ``prev_lr`` (the LR of the last
    applied update, for momentum correction) and ``skipped`` (non-finite
    steps skipped).
    """

    def __init__(self, cfg: Any, decay: Sequence[bool], adapt: Sequence[bool]):
        if not isinstance(cfg, (_config.SGDConfig, _config.LARSConfig, _config.LAMBConfig)):
            raise ValueError(
                f"cfg must be an optimizer record from config.optimizer_config "
                f"({', '.join(_config.OPTIMIZER_NAMES)}), got {cfg!r}"
            )
        if len(decay) != len(adapt):
            raise ValueError(f"decay and adapt must have one entry per tensor, got {len(decay)} and {len(adapt)}")
        self.cfg = cfg
        self.decay = [bool(d) for d in decay]
        self.adapt = [bool(a) for a in adapt]
        self.state: dict[str, Any] = {"step": 0, "prev_lr": None, "skipped": 0}

    @classmethod
    def for_tensors(
        cls,
        cfg: Any,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]],
        exclude_from_weight_decay: _config.ExclusionSpec = None,
        exclude_from_layer_adaptation: _config.ExclusionSpec = None,
    ) -> ReferenceOptimizer:
        """Builds the oracle deciding ``decay``/``adapt`` with the package's exclusion rules."""
        no_decay = _config.resolve_exclusion(exclude_from_weight_decay, "exclude_from_weight_decay")
        no_adapt = _config.resolve_exclusion(exclude_from_layer_adaptation, "exclude_from_layer_adaptation")
        return cls(
            cfg,
            decay=[not no_decay(n, s) for n, s in zip(names, shapes)],
            adapt=[not no_adapt(n, s) for n, s in zip(names, shapes)],
        )

    def step(
        self,
        params: Sequence[np.ndarray],
        grads: Sequence[np.ndarray],
        lr: float,
        grad_norms: Sequence[float] | None = None,
    ) -> list[np.ndarray]:
        """Applies one update and returns the new parameters (float64 copies).

        Args:
            params: current tensors.
            grads: gradients of the mean loss over the global batch.
            lr: the global learning rate of this step.
            grad_norms: CLARS only, the per-tensor mean per-example gradient
                norms ``s``; required for CLARS, refused otherwise.
        """
        cfg = self.cfg
        lr = _config.check_non_negative("lr", lr)
        params = [np.asarray(p, dtype=np.float64) for p in params]
        grads = [np.asarray(g, dtype=np.float64) for g in grads]
        if len(params) != len(self.decay) or len(grads) != len(params):
            raise ValueError(f"expected {len(self.decay)} params and grads, got {len(params)} and {len(grads)}")
        is_clars = isinstance(cfg, _config.CLARSConfig)
        if is_clars and grad_norms is None:
            raise ValueError("grad_norms (mean per-example gradient norms) is required for CLARS")
        if not is_clars and grad_norms is not None:
            raise ValueError("grad_norms is only used by CLARS")

        finite = all(np.all(np.isfinite(g)) for g in grads)
        if grad_norms is not None:
            finite = finite and all(math.isfinite(s) for s in grad_norms)
        if not finite:
            if cfg.nonfinite == "raise":
                raise FloatingPointError("non-finite gradient")
            self.state["skipped"] += 1
            return [p.copy() for p in params]

        self.state["step"] += 1
        if isinstance(cfg, _config.LAMBConfig):
            new = self._lamb(params, grads, lr)
        else:
            new = self._momentum(params, grads, lr, grad_norms)
        self.state["prev_lr"] = float(lr)
        return new

    def _momentum(self, params, grads, lr, grad_norms):
        cfg = self.cfg
        velocity = self.state.setdefault("velocity", [np.zeros_like(p) for p in params])
        prev = self.state["prev_lr"]
        if cfg.momentum_correction and prev is not None:
            factor = momentum_correction(prev, lr)
            velocity = [v * factor for v in velocity]
        out, new_velocity = [], []
        for i, (w, g, v) in enumerate(zip(params, grads, velocity)):
            # The momentum-family arguments, the same for SGD and LARS.
            family = dict(lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                          decay=self.decay[i])
            if isinstance(cfg, _config.LARSConfig):
                w, v = lars_update(
                    w, v, g, **family,
                    trust_coefficient=cfg.trust_coefficient,
                    eps=cfg.eps,
                    clip=cfg.clip,
                    adapt=self.adapt[i],
                    g_norm=None if grad_norms is None else float(grad_norms[i]),
                )
            else:
                w, v = sgd_update(w, v, g, **family)
            out.append(w)
            new_velocity.append(v)
        self.state["velocity"] = new_velocity
        return out

    def _lamb(self, params, grads, lr):
        cfg = self.cfg
        mus = self.state.setdefault("mu", [np.zeros_like(p) for p in params])
        nus = self.state.setdefault("nu", [np.zeros_like(p) for p in params])
        out, new_mu, new_nu = [], [], []
        for i, (w, g, mu, nu) in enumerate(zip(params, grads, mus, nus)):
            w, mu, nu = lamb_update(
                w,
                mu,
                nu,
                g,
                step=self.state["step"],
                lr=lr,
                beta1=cfg.beta1,
                beta2=cfg.beta2,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,
                decay=self.decay[i],
                adapt=self.adapt[i],
            )
            out.append(w)
            new_mu.append(mu)
            new_nu.append(nu)
        self.state["mu"], self.state["nu"] = new_mu, new_nu
        return out
