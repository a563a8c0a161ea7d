"""Keras 3 momentum optimizers with the LR inside the velocity: SGD, LARS/LARC and CLARS.

All three share one batched update (:class:`_MomentumRule`); they differ only
in the per-tensor rate that multiplies the decayed gradient:

* :class:`SGD`: ``rate = gamma``;
* :class:`LARS`: ``rate = gamma * lambda`` with the layer-wise trust ratio
  ``lambda`` of You, Gitman and Ginsburg (2017); ``clip=True`` is LARC
  (``rate = min(gamma, lambda)``);
* :class:`CLARS`: LARS with ``||g||`` replaced by the mean per-example gradient
  norm ``s`` of Huo, Gu and Huang (2021), supplied each step through
  :meth:`CLARS.set_grad_norms` (done for you by :class:`hvd_largebatch.tf.CLARSModel`).

The math is ALGORITHMS.md; the NumPy oracle is
:class:`hvd_largebatch.reference.ReferenceOptimizer`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from hvd_largebatch import config
from hvd_largebatch.schedules import momentum_correction
from hvd_largebatch.tf import fused_kernels, update_rules
from hvd_largebatch.tf.large_batch_optimizer import LargeBatchOptimizer, tensor_of, tensor_path

__all__ = ["SGD", "LARS", "CLARS"]

_SGD = config.SGDConfig()
_LARS = config.LARSConfig()
_CLARS = config.CLARSConfig()


class _MomentumRule(LargeBatchOptimizer):
    """The shared "LR inside the velocity" step; subclasses define :meth:`_rates`.

    The slot ``momentums[i]`` holds ``m = -v`` (Keras's sign, as
    ``keras.optimizers.SGD``), so the weight step is ``w = w + m``.
    """

    def _build_slots(self, variables: Sequence[Any]) -> None:
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def _rates(self, grads, variables, indices, lr):
        """Per-tensor rates (a vector over ``variables``) and the finiteness flag of the step."""
        raise NotImplementedError(f"{type(self).__name__} must define its per-tensor rates (_rates)")

    def _gradient_stats(self, grads, variables, indices, *, norms_of_g: bool, norms_of_w: bool):
        """Per-tensor vectors ``(check, ||g||^2, ||w||^2)`` of this step's gradients and weights.

        ``check`` is the statistic whose finiteness decides the step: ``||g||^2``
        where the tensor is adapted and ``norms_of_g`` (computed anyway), else
        ``sum(g)``. The norms are those of adapted tensors (0 elsewhere, and
        where not asked for). With our CPU kernels all of it takes one pass
        over ``g`` (and ``w``); otherwise one TensorFlow reduction per value.
        """
        sd = self._scalar_dtype
        adapt = self._adapt_vector(indices)
        zero = ops.zeros((), dtype=sd)
        if self._native_kernels:
            stats = ops.cast(fused_kernels.tensor_stats(grads, variables if norms_of_w else None), sd)
            sums, w_sq = stats[:, 0], ops.where(adapt, stats[:, 2], zero)
            if not norms_of_g:
                return sums, ops.zeros_like(sums), w_sq
            g_sq = ops.where(adapt, stats[:, 1], zero)
            return ops.where(adapt, g_sq, sums), g_sq, w_sq
        adapted = [self._adapt[i] for i in indices]
        g_sq = [self._squared_norm(g) if a and norms_of_g else zero for g, a in zip(grads, adapted)]
        w_sq = [self._squared_norm(w) if a and norms_of_w else zero for w, a in zip(variables, adapted)]
        check = [sq if a and norms_of_g else ops.sum(g) for g, sq, a in zip(grads, g_sq, adapted)]
        return self._stack_scalars(check), self._stack_scalars(g_sq), self._stack_scalars(w_sq)

    def _batched_update(self, grads, variables, indices, lr) -> None:
        cfg = self.core_config
        rates, finite = self._rates(grads, variables, indices, lr)
        # c = gamma_t / gamma_prev (1 before the first step), the core's factor; never includes m.
        correction = (
            momentum_correction(self.prev_learning_rate, lr, xp=ops) if cfg.momentum_correction else ops.ones_like(lr)
        )
        velocity_scale = tensor_of(cfg.momentum, self._scalar_dtype) * correction

        if self._native_kernels:
            dtype = variables[0].dtype

            def apply_all():
                fused_kernels.apply_momentum_all(
                    variables,
                    [self.momentums[i] for i in indices],
                    grads,
                    ops.cast(rates, dtype),
                    self._decay_constants(indices, cfg.weight_decay, dtype),
                    ops.cast(velocity_scale, dtype),
                    tensor_of(cfg.momentum, dtype),
                    nesterov=cfg.nesterov,
                )

            self._guarded(finite, apply_all, lr)
            return

        def apply_all():
            rate_list = ops.unstack(rates)
            for g, w, i, rate in zip(grads, variables, indices, rate_list):
                dtype = w.dtype
                m = self.momentums[i]
                rate, scale = ops.cast(rate, dtype), ops.cast(velocity_scale, dtype)
                d = update_rules.decayed_gradient(
                    g, w, tensor_of(cfg.weight_decay, dtype) if self._decay[i] else None
                )
                if self.fused and not cfg.nesterov:
                    fused_kernels.apply_momentum(w, m, d, rate, scale)
                    continue
                # Assign the slot, then read it back: the new value is never copied.
                self.assign(m, update_rules.momentum_buffer(m, d, rate, scale))
                if cfg.nesterov:
                    self.assign_add(w, update_rules.nesterov_weight_step(m, d, rate, tensor_of(cfg.momentum, dtype)))
                else:
                    self.assign_add(w, m)

        self._guarded(finite, apply_all, lr)

    def _momentum_hyperparameters(self) -> dict[str, Any]:
        cfg = self.core_config
        return {"momentum": cfg.momentum, "nesterov": cfg.nesterov, "momentum_correction": cfg.momentum_correction}


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class SGD(_MomentumRule):
    """Momentum SGD with the learning rate inside the velocity, and momentum correction.

    Math (ALGORITHMS.md, SGD), per tensor, ``beta`` only where weight decay applies::

        d = g + beta * w
        v = m * (gamma_t / gamma_prev) * v + gamma_t * d     (ratio only with momentum_correction)
        w = w - v                                            (Nesterov: w - (m * v + gamma_t * d))

    Note:
        ``keras.optimizers.SGD`` keeps the same velocity up to sign but has no
        momentum correction, so when the LR changes (warmup) the two differ;
        this one is what Goyal et al. (2017) describe. Weight decay is coupled
        (added to the gradient), never Keras's decoupled ``weight_decay``.

    Args:
        learning_rate: ``gamma``: a number, a ``LearningRateSchedule`` or a callable.
        momentum: ``m`` in [0, 1).
        weight_decay: coupled L2 coefficient ``beta`` >= 0.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        momentum_correction: rescale the velocity by ``gamma_t / gamma_prev`` when the LR changes.
        exclude_from_weight_decay: which tensors get no decay: None (default rule:
            ``ndim <= 1`` or a path matching bias/bn/batchnorm/norm), False, regex(es)
            on ``variable.path``, or a callable ``(path, shape) -> bool``.
        nonfinite: ``"skip"`` (default: skip and count the step) or ``"raise"``.
        fused: do the momentum step with TensorFlow's single-pass kernels
            (True, the default), with the package's CPU kernels where they
            apply (``"native"``: built with the system C++ compiler on first
            use; see :mod:`hvd_largebatch.tf.fused_kernels`) or with
            ``keras.ops`` alone (False).
        name: optimizer name.
        **kwargs: Keras base optimizer arguments (``clipnorm``, ``use_ema``, ...),
            except ``weight_decay``'s decoupled meaning.

    Example:
        >>> import keras
        >>> from hvd_largebatch.tf import SGD
        >>> opt = SGD(learning_rate=0.1, momentum=0.9, weight_decay=1e-4)
        >>> w = keras.Variable([[1.0, 2.0]], name="kernel")
        >>> opt.apply([keras.ops.ones((1, 2))], [w])
        >>> [round(float(x), 4) for x in w.numpy()[0]]  # w - 0.1 * (1 + 1e-4 * w)
        [0.9, 1.9]
    """

    core_name = "sgd"
    has_layer_adaptation = False

    def __init__(
        self,
        learning_rate: Any = _SGD.lr,
        momentum: float = _SGD.momentum,
        weight_decay: float = _SGD.weight_decay,
        nesterov: bool = _SGD.nesterov,
        momentum_correction: bool = _SGD.momentum_correction,
        exclude_from_weight_decay: config.ExclusionSpec = None,
        nonfinite: str = _SGD.nonfinite,
        fused: bool | str = True,
        name: str = "sgd",
        **kwargs: Any,
    ):
        super().__init__(
            learning_rate,
            dict(momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, momentum_correction=momentum_correction),
            exclude_from_weight_decay=exclude_from_weight_decay,
            nonfinite=nonfinite,
            fused=fused,
            name=name,
            **kwargs,
        )
        self.momentum = self.core_config.momentum
        self.nesterov = self.core_config.nesterov
        self.momentum_correction = self.core_config.momentum_correction

    def _rates(self, grads, variables, indices, lr):
        check, _, _ = self._gradient_stats(grads, variables, indices, norms_of_g=False, norms_of_w=False)
        return lr * ops.ones((len(variables),), dtype=self._scalar_dtype), self._all_finite(check)

    def _keras_hyperparameters(self) -> dict[str, Any]:
        return self._momentum_hyperparameters()


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class LARS(_MomentumRule):
    """LARS (You, Gitman, Ginsburg 2017, Algorithm 1); ``clip=True`` is LARC.

    Math (ALGORITHMS.md, LARS), per tensor ``w`` with gradient ``g``::

        d      = g + beta * w                                   (if decay applies)
        lambda = eta * ||w|| / (||g|| + beta * ||w|| + eps)      (if adapted and ||w||, ||g|| > 0; else 1)
        v      = m * (gamma_t / gamma_prev) * v + gamma_t * lambda * d
        w      = w - v                                          (Nesterov: w - (m * v + gamma_t * lambda * d))

    LARC (``clip=True``, as NVIDIA apex LARC and timm ``trust_clip``): an
    adapted tensor uses ``min(gamma_t, lambda)`` in place of ``gamma_t * lambda``.

    Note:
        The LR sits inside the velocity (as in the paper's Algorithm 1), so a
        changing LR needs momentum correction (Goyal et al. 2017, on by
        default); with a constant LR the trajectory equals timm's
        ``Lars(always_adapt=True)``. Weight decay is coupled. Biases and
        normalisation parameters are excluded from decay and adaptation by
        default (see ``exclude_from_weight_decay``); they take plain momentum SGD.

    Args:
        learning_rate: ``gamma``: a number, a ``LearningRateSchedule`` or a callable.
        momentum: ``m`` in [0, 1).
        weight_decay: coupled L2 coefficient ``beta`` >= 0.
        trust_coefficient: ``eta`` > 0.
        epsilon: ``eps`` >= 0 added to the trust-ratio denominator.
        nesterov: Nesterov momentum.
        clip: LARC mode.
        momentum_correction: rescale the velocity when the LR changes.
        exclude_from_weight_decay: tensors without decay; None = default rule
            (``ndim <= 1`` or path matching bias/bn/batchnorm/norm), False,
            regex(es) on ``variable.path`` or a callable ``(path, shape) -> bool``.
        exclude_from_layer_adaptation: tensors without the trust ratio, same forms.
        nonfinite: ``"skip"`` (default) or ``"raise"``.
        fused: norms and momentum step with TensorFlow's single-pass
            kernels (True, the default), with the package's CPU kernels where they apply
            (``"native"``: built with the system C++ compiler on first use;
            see :mod:`hvd_largebatch.tf.fused_kernels`) or with ``keras.ops``
            alone (False).
        name: optimizer name.
        **kwargs: Keras base optimizer arguments (``clipnorm``, ``use_ema``, ...).

    Example:
        >>> import keras
        >>> from hvd_largebatch.tf import LARS
        >>> opt = LARS(learning_rate=0.1, exclude_from_layer_adaptation=False)
        >>> w = keras.Variable([[1.0, 1.0], [1.0, 1.0]], name="kernel")
        >>> opt.apply([keras.ops.full((2, 2), 0.5)], [w])  # lambda = 0.001 * 2 / 1
        >>> round(float(w.numpy()[0, 0]), 6)
        0.9999
    """

    core_name = "lars"

    def __init__(
        self,
        learning_rate: Any = _LARS.lr,
        momentum: float = _LARS.momentum,
        weight_decay: float = _LARS.weight_decay,
        trust_coefficient: float = _LARS.trust_coefficient,
        epsilon: float = _LARS.eps,
        nesterov: bool = _LARS.nesterov,
        clip: bool = _LARS.clip,
        momentum_correction: bool = _LARS.momentum_correction,
        exclude_from_weight_decay: config.ExclusionSpec = None,
        exclude_from_layer_adaptation: config.ExclusionSpec = None,
        nonfinite: str = _LARS.nonfinite,
        fused: bool | str = True,
        name: str = "lars",
        **kwargs: Any,
    ):
        extra = self._extra_hyperparameters(kwargs)
        super().__init__(
            learning_rate,
            dict(
                momentum=momentum,
                weight_decay=weight_decay,
                trust_coefficient=trust_coefficient,
                epsilon=epsilon,
                nesterov=nesterov,
                clip=clip,
                momentum_correction=momentum_correction,
                **extra,
            ),
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            nonfinite=nonfinite,
            fused=fused,
            name=name,
            **kwargs,
        )
        cfg = self.core_config
        self.momentum = cfg.momentum
        self.trust_coefficient = cfg.trust_coefficient
        self.epsilon = cfg.eps
        self.nesterov = cfg.nesterov
        self.clip = cfg.clip
        self.momentum_correction = cfg.momentum_correction

    def _extra_hyperparameters(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Hook for CLARS, which pops its own arguments out of ``kwargs``."""
        return {}

    def _effective_rates(self, lr, w_norm, g_norm, indices):
        """The per-tensor rates ``gamma * lambda`` (or LARC's ``min(gamma, lambda)``) of this step."""
        cfg = self.core_config
        sd = self._scalar_dtype
        adapt = self._adapt_vector(indices)
        local = update_rules.lars_local_rates(
            w_norm,
            g_norm,
            adapt=adapt,
            decay=self._decay_vector(indices),
            trust_coefficient=tensor_of(cfg.trust_coefficient, sd),
            weight_decay=tensor_of(cfg.weight_decay, sd),
            eps=tensor_of(cfg.eps, sd),
        )
        return update_rules.effective_rates(local, adapt=adapt, lr=lr, clip=cfg.clip)

    def _rates(self, grads, variables, indices, lr):
        check, g_sq, w_sq = self._gradient_stats(grads, variables, indices, norms_of_g=True, norms_of_w=True)
        finite = self._all_finite(check)
        g_norm = ops.sqrt(ops.where(ops.isfinite(g_sq), g_sq, 0))
        w_norm = ops.sqrt(w_sq)
        return self._effective_rates(lr, w_norm, g_norm, indices), finite

    def _keras_hyperparameters(self) -> dict[str, Any]:
        cfg = self.core_config
        return {
            **self._momentum_hyperparameters(),
            "trust_coefficient": cfg.trust_coefficient,
            "epsilon": cfg.eps,
            "clip": cfg.clip,
        }


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class CLARS(LARS):
    """CLARS (Huo, Gu, Huang, AAAI 2021): LARS with the mean per-example gradient norm.

    Math (ALGORITHMS.md, CLARS): as :class:`LARS` with ``||g||`` in the trust
    ratio replaced by ``s = (1/B) sum_i ||grad_l f_i(w)||``, the mean over the
    global batch of the per-example gradient norms of the tensor::

        lambda = eta * ||w|| / (s + beta * ||w|| + eps)    (if adapted and ||w||, s > 0; else 1)

    The optimizer itself only sees averaged gradients: ``s`` is supplied each
    step by :meth:`set_grad_norms`. Under ``model.fit`` wrap the model in
    :class:`hvd_largebatch.tf.CLARSModel`, which computes ``s`` with the
    ``estimator`` chosen here (``"exact"`` per-example gradients, chunked by
    ``chunk_size``; or ``"microbatch:k"``) and averages it across Horovod ranks.

    Note:
        The paper is meant to be run without warmup; pair it with a schedule
        that has none. Reading ``s`` as the mean of per-example norms over
        the global batch, per tensor, is our interpretation (ALGORITHMS.md).
        A step run without fresh norms raises instead of silently using
        stale or zero ones.

    Args:
        estimator: ``"exact"`` or ``"microbatch:k"``; read by ``CLARSModel``.
        chunk_size: examples per vectorised chunk of the exact estimator.
        All other arguments: as :class:`LARS`.

    Example:
        >>> import keras
        >>> from hvd_largebatch.tf import CLARS
        >>> opt = CLARS(learning_rate=0.1, exclude_from_layer_adaptation=False)
        >>> w = keras.Variable([[1.0, 1.0], [1.0, 1.0]], name="kernel")
        >>> opt.build([w])
        >>> opt.set_grad_norms({"kernel": 2.0})  # mean per-example norm s = 2: lambda = 0.001 * 2 / 2
        >>> opt.apply([keras.ops.full((2, 2), 0.5)], [w])
        >>> round(float(w.numpy()[0, 0]), 6)
        0.99995
    """

    core_name = "clars"

    def __init__(
        self,
        learning_rate: Any = _CLARS.lr,
        momentum: float = _CLARS.momentum,
        weight_decay: float = _CLARS.weight_decay,
        trust_coefficient: float = _CLARS.trust_coefficient,
        epsilon: float = _CLARS.eps,
        nesterov: bool = _CLARS.nesterov,
        clip: bool = _CLARS.clip,
        momentum_correction: bool = _CLARS.momentum_correction,
        exclude_from_weight_decay: config.ExclusionSpec = None,
        exclude_from_layer_adaptation: config.ExclusionSpec = None,
        nonfinite: str = _CLARS.nonfinite,
        estimator: str = _CLARS.estimator,
        chunk_size: int = _CLARS.chunk_size,
        fused: bool | str = True,
        name: str = "clars",
        **kwargs: Any,
    ):
        kwargs.update(estimator=estimator, chunk_size=chunk_size)
        super().__init__(
            learning_rate,
            momentum,
            weight_decay,
            trust_coefficient,
            epsilon,
            nesterov,
            clip,
            momentum_correction,
            exclude_from_weight_decay,
            exclude_from_layer_adaptation,
            nonfinite,
            fused,
            name,
            **kwargs,
        )
        self.estimator = self.core_config.estimator
        self.chunk_size = self.core_config.chunk_size

    def _extra_hyperparameters(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"estimator": kwargs.pop("estimator"), "chunk_size": kwargs.pop("chunk_size")}

    def _build_slots(self, variables: Sequence[Any]) -> None:
        super()._build_slots(variables)
        self.grad_norm_means = self.add_variable(
            (len(variables),), initializer="zeros", dtype=self._scalar_dtype, name="grad_norm_means"
        )
        self.grad_norms_fresh = self.add_variable((), initializer="zeros", dtype="int", name="grad_norms_fresh")

    def set_grad_norms(self, norms: Mapping[Any, Any]) -> None:
        """Supplies ``s``, the mean per-example gradient norm of each variable, for the next step.

        The same argument as :meth:`hvd_largebatch.torch_impl.CLARS.set_grad_norms`:
        a mapping from a tensor's full name to its ``s``.

        Args:
            norms: ``{variable.path (or the variable): s}`` covering every
                variable the trust ratio applies to; ``s`` a scalar (number or
                0-d tensor, also inside a ``tf.function``). Entries for
                variables without adaptation are accepted and not used.

        Raises:
            ValueError: before ``build``, for a non-mapping, a key that names
                no variable of the optimizer, a non-scalar value, or a missing
                adapted variable.
        """
        if not self.built:
            raise ValueError("build the optimizer (optimizer.build(variables)) before set_grad_norms()")
        if not isinstance(norms, Mapping):
            raise ValueError(
                f"norms must be a mapping from variable path (or variable) to s, got {type(norms).__name__}"
            )
        index = {path: i for i, path in enumerate(self._paths)}
        values: list[Any] = [None] * len(self._paths)
        for key, value in norms.items():
            path = key if isinstance(key, str) else tensor_path(key)
            if path not in index:
                raise ValueError(f"norms has a key {key!r} that names no variable of this optimizer")
            value = tensor_of(value, self._scalar_dtype)
            if len(value.shape) != 0:
                raise ValueError(f"norms[{key!r}] must be a scalar, got shape {tuple(value.shape)}")
            values[index[path]] = value
        missing = [path for path, value, adapt in zip(self._paths, values, self._adapt) if value is None and adapt]
        if missing:
            raise ValueError(f"norms must cover every adapted variable; missing {', '.join(missing)}")
        zero = ops.zeros((), dtype=self._scalar_dtype)
        self.grad_norm_means.assign(ops.stack([zero if value is None else value for value in values]))
        self.grad_norms_fresh.assign(ops.cast(1, self.grad_norms_fresh.dtype))

    def _rates(self, grads, variables, indices, lr):
        fresh = ops.equal(self.grad_norms_fresh, 1)
        message = (
            f"{self.name}: CLARS needs the mean per-example gradient norms of every step: call "
            "set_grad_norms() before apply(), or train the model wrapped in hvd_largebatch.tf.CLARSModel"
        )
        if tf.executing_eagerly():
            if not bool(fresh):
                raise ValueError(message)
        else:
            tf.debugging.Assert(fresh, [message])
        self.grad_norms_fresh.assign(ops.cast(0, self.grad_norms_fresh.dtype))
        s = ops.take(self.grad_norm_means, ops.convert_to_tensor(indices, dtype="int32"))
        check, _, w_sq = self._gradient_stats(grads, variables, indices, norms_of_g=False, norms_of_w=True)
        finite = ops.logical_and(self._all_finite(check), self._all_finite(s))
        w_norm = ops.sqrt(w_sq)
        s = ops.where(ops.isfinite(s), s, 0)
        return self._effective_rates(lr, w_norm, s, indices), finite

    def _keras_hyperparameters(self) -> dict[str, Any]:
        return {**super()._keras_hyperparameters(), "estimator": self.estimator, "chunk_size": self.chunk_size}
