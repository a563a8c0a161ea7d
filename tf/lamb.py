"""Keras 3 LAMB (You et al. 2019) with coupled weight decay and the package's per-tensor switches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from hvd_largebatch import config
from hvd_largebatch.tf import fused_kernels, update_rules
from hvd_largebatch.tf.large_batch_optimizer import LargeBatchOptimizer, tensor_of

__all__ = ["LAMB"]

_LAMB = config.LAMBConfig()


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class LAMB(LargeBatchOptimizer):
    """LAMB: Adam's direction with a layer-wise trust ratio (You et al., ICLR 2020).

    Math (ALGORITHMS.md, LAMB), per tensor, ``t`` counting applied steps from 1::

        mu = b1 * mu + (1 - b1) * g ;   nu = b2 * nu + (1 - b2) * g * g
        mh = mu / (1 - b1^t) ;          nh = nu / (1 - b2^t)
        u  = mh / (sqrt(nh) + eps) + beta * w           (beta term if decay applies)
        r  = ||w|| / ||u||  if adapted and both > 0, else 1
        w  = w - gamma_t * r * u

    Note:
        Differs from ``keras.optimizers.Lamb`` in three ways: weight decay is
        part of the update direction (as in the paper) instead of absent or
        decoupled; biases and normalisation parameters are excluded from
        decay and adaptation by default; a step with non-finite gradients is
        skipped (``t`` counts applied steps only, ``iterations`` counts all).
        The slots ``first_moments`` and ``second_moments`` hold ``mu`` and
        ``nu`` as above, the same quantities as torch's ``exp_avg`` and
        ``exp_avg_sq``; the bias corrections are folded into two scalars (see
        :func:`hvd_largebatch.tf.update_rules.lamb_bias_corrections`), which
        saves passes over memory and changes nothing but rounding. Weights
        saved by an earlier version, whose slots held ``mu / (1 - b1)`` and
        ``nu / (1 - b2)``, are recognised on load (they lack the
        ``moment_format`` variable) and converted.

    Args:
        learning_rate: ``gamma``: a number, a ``LearningRateSchedule`` or a callable.
        beta_1: ``b1`` in [0, 1).
        beta_2: ``b2`` in [0, 1).
        epsilon: ``eps`` >= 0.
        weight_decay: coupled ``beta`` >= 0.
        exclude_from_weight_decay, exclude_from_layer_adaptation: None (default
            rule: ``ndim <= 1`` or a path matching bias/bn/batchnorm/norm), False,
            regex(es) on ``variable.path``, or a callable ``(path, shape) -> bool``.
        nonfinite: ``"skip"`` (default) or ``"raise"``.
        fused: norms and the weight step with TensorFlow's single-pass
            kernels (True, the default), with the package's CPU kernels where they apply
            (``"native"``: built with the system C++ compiler on first use;
            see :mod:`hvd_largebatch.tf.fused_kernels`) or with ``keras.ops``
            alone (False).
        name: optimizer name.
        **kwargs: Keras base optimizer arguments (``clipnorm``, ``use_ema``, ...).

    Example:
        >>> import keras
        >>> from hvd_largebatch.tf import LAMB
        >>> opt = LAMB(learning_rate=0.01, weight_decay=0.0)
        >>> w = keras.Variable([[3.0, 4.0]], name="kernel")
        >>> opt.apply([keras.ops.ones((1, 2))], [w])  # u = (1, 1); r = 5 / sqrt(2)
        >>> [round(float(x), 4) for x in w.numpy()[0]]
        [2.9646, 3.9646]
    """

    core_name = "lamb"

    def __init__(
        self,
        learning_rate: Any = _LAMB.lr,
        beta_1: float = _LAMB.beta1,
        beta_2: float = _LAMB.beta2,
        epsilon: float = _LAMB.eps,
        weight_decay: float = _LAMB.weight_decay,
        exclude_from_weight_decay: config.ExclusionSpec = None,
        exclude_from_layer_adaptation: config.ExclusionSpec = None,
        nonfinite: str = _LAMB.nonfinite,
        fused: bool | str = True,
        name: str = "lamb",
        **kwargs: Any,
    ):
        super().__init__(
            learning_rate,
            dict(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, weight_decay=weight_decay),
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            nonfinite=nonfinite,
            fused=fused,
            name=name,
            **kwargs,
        )
        cfg = self.core_config
        self.beta_1 = cfg.beta1
        self.beta_2 = cfg.beta2
        self.epsilon = cfg.eps

    def _build_slots(self, variables: Sequence[Any]) -> None:
        # mu and nu of ALGORITHMS.md, as torch's exp_avg and exp_avg_sq.
        self.first_moments, self.second_moments = self.add_optimizer_variables(
            variables, ["first_moment", "second_moment"]
        )
        # Marks the slot contents (1: mu and nu). Created last, so weights saved before it
        # existed (slots holding mu / (1 - b1) and nu / (1 - b2)) have one variable fewer.
        self.moment_format = self.add_variable((), initializer="ones", dtype="int", name="moment_format")

    def load_own_variables(self, store) -> None:
        """Loads saved optimizer variables; converts those saved when the slots held ``mu / (1 - b1)``."""
        if not self.built or len(store.keys()) != len(self.variables) - 1:
            super().load_own_variables(store)
            return
        for i, variable in enumerate(self.variables[:-1]):  # all but moment_format, the last one
            variable.assign(store[str(i)])
        for slots, beta in ((self.first_moments, self.core_config.beta1), (self.second_moments, self.core_config.beta2)):
            for slot in slots:
                slot.assign(slot * tensor_of(1.0 - beta, slot.dtype))
        self.moment_format.assign(ops.cast(1, self.moment_format.dtype))

    def _batched_update(self, grads, variables, indices, lr) -> None:
        cfg = self.core_config
        sd = self._scalar_dtype
        finite = self._all_finite(self._stack_scalars([ops.sum(g) for g in grads]))
        # t counts applied updates: apply() calls so far, minus the skipped ones, plus this one.
        step = ops.cast(self.iterations - self.skipped_steps + 1, sd)
        scale, scaled_eps = update_rules.lamb_bias_corrections(
            step, tensor_of(cfg.beta1, sd), tensor_of(cfg.beta2, sd), tensor_of(cfg.eps, sd)
        )
        decay_over_scale = tensor_of(cfg.weight_decay, sd) / scale
        if self._native_kernels:
            self._native_update(grads, variables, indices, lr, scale, scaled_eps, decay_over_scale)
            return

        def apply_all():
            directions, w_sq, u_sq = [], [], []
            zero = ops.zeros((), dtype=sd)
            for g, w, i in zip(grads, variables, indices):
                dtype = w.dtype
                first, second = self.first_moments[i], self.second_moments[i]
                new_first, new_second = update_rules.lamb_moments(
                    first, second, g, tensor_of(cfg.beta1, dtype), tensor_of(cfg.beta2, dtype)
                )
                # Assign, then read the slots back: the new values are never copied.
                self.assign(first, new_first)
                self.assign(second, new_second)
                direction = update_rules.lamb_direction(
                    first,
                    second,
                    w,
                    ops.cast(scaled_eps, dtype),
                    ops.cast(decay_over_scale, dtype) if self._decay[i] else None,
                )
                directions.append(direction)
                w_sq.append(self._squared_norm(w) if self._adapt[i] else zero)
                u_sq.append(self._squared_norm(direction) if self._adapt[i] else zero)
            # ||u|| = A * ||direction||; tensors not adapted get ratio 1.
            ratios = update_rules.trust_ratio(
                ops.sqrt(self._stack_scalars(w_sq)), scale * ops.sqrt(self._stack_scalars(u_sq))
            )
            step_sizes = ops.unstack(lr * ratios * scale)
            for w, direction, step_size in zip(variables, directions, step_sizes):
                if self.fused:
                    fused_kernels.apply_scaled_step(w, ops.cast(step_size, w.dtype), direction)
                else:
                    self.assign_sub(w, ops.cast(step_size, w.dtype) * direction)

        self._guarded(finite, apply_all, lr)

    def _native_update(self, grads, variables, indices, lr, scale, scaled_eps, decay_over_scale) -> None:
        """The same step with our CPU kernels: one pass reads everything for the norms, one writes.

        The first pass writes nothing (so a non-finite step is still skipped
        with no trace); the second recomputes the moments and the direction
        with the same arithmetic and applies them.
        """
        cfg = self.core_config
        dtype = variables[0].dtype
        first = [self.first_moments[i] for i in indices]
        second = [self.second_moments[i] for i in indices]
        b1, b2 = tensor_of(cfg.beta1, dtype), tensor_of(cfg.beta2, dtype)
        eps = ops.cast(scaled_eps, dtype)
        decays = ops.where(self._decay_vector(indices), ops.cast(decay_over_scale, dtype), 0)
        stats = ops.cast(fused_kernels.lamb_stats(grads, first, second, variables, b1, b2, eps, decays), self._scalar_dtype)
        finite = self._all_finite(stats[:, 0])
        # ||u|| = A * ||direction||; tensors not adapted get ratio 1 (trust_ratio(0, 0)).
        adapt = self._adapt_vector(indices)
        w_sq, q_sq = ops.where(adapt, stats[:, 1], 0), ops.where(adapt, stats[:, 2], 0)
        ratios = update_rules.trust_ratio(ops.sqrt(w_sq), scale * ops.sqrt(q_sq))
        step_sizes = ops.cast(lr * ratios * scale, dtype)

        def apply_all():
            fused_kernels.lamb_apply(variables, first, second, grads, b1, b2, eps, decays, step_sizes)

        self._guarded(finite, apply_all, lr)

    def _keras_hyperparameters(self) -> dict[str, Any]:
        cfg = self.core_config
        return {"beta_1": cfg.beta1, "beta_2": cfg.beta2, "epsilon": cfg.eps}
