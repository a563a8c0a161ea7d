"""Mixed precision under Horovod for Keras 3: dynamic loss scaling whose skip decision is the same on every rank.

Under the ``mixed_float16`` dtype policy ``model.compile`` wraps the optimizer
in ``keras.optimizers.LossScaleOptimizer``, which checks each rank's *local*
gradients for Inf/NaN and, when it finds one, skips ``apply`` on that rank
only. Around :class:`~hvd_largebatch.tf.DistributedOptimizer` that skips the
allreduce on one rank while the others wait in it: the job hangs.
:class:`DistributedLossScaleOptimizer` is a ``LossScaleOptimizer`` (so
``model.compile`` does not wrap it again) that reorders the step::

    g_avg  = allreduce_average(g_scaled)         # every rank, always
    finite = all(isfinite(g_avg))                # identical on every rank
    if finite:  inner.apply(g_avg / S);  S = 2*S after `dynamic_growth_steps` finite steps in a row
    else:       skip the step;           S = S/2

so ranks skip together and keep the same loss scale ``S``; the wrapped
optimizer sees unscaled gradients (the trust ratios of LARS/LAMB are computed
on true gradients) and, with ``mixed_float16`` or ``mixed_bfloat16``, float32
variables, so its slots and the master weights are float32.
``mixed_bfloat16`` needs no loss scaling (``model.compile`` adds none).

The package's optimizers refuse float16/bfloat16 *variables* (the pure
``float16``/``bfloat16`` policies) in ``build``: their state would be half
precision, and LAMB's second moment underflows there.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from hvd_largebatch import config
from hvd_largebatch.tf.distributed import DistributedOptimizer, find_distributed_optimizer

__all__ = ["DistributedLossScaleOptimizer", "HALF_VARIABLE_DTYPES", "check_variable_dtypes"]

#: Variable dtypes the package's optimizers refuse (the state would be half precision too).
HALF_VARIABLE_DTYPES = ("float16", "bfloat16")


def check_variable_dtypes(optimizer_name: str, variables: Any) -> None:
    """Raises ``ValueError`` when a variable is float16/bfloat16, naming it and the policy to use instead."""
    for variable in variables:
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if dtype in HALF_VARIABLE_DTYPES:
            raise ValueError(
                f"{optimizer_name} got variable {getattr(variable, 'path', variable.name)!r} of dtype {dtype}; "
                f"variables must be float32 or float64 (allowed policies: 'float32', 'float64', 'mixed_float16', "
                f"'mixed_bfloat16'): use keras.mixed_precision.set_global_policy('mixed_{dtype}'), which computes "
                f"in {dtype} and keeps float32 variables and optimizer state"
            )


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class DistributedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Dynamic loss scaling decided on the Horovod-averaged gradients (see the module docstring).

    Args:
        inner_optimizer: a :class:`~hvd_largebatch.tf.DistributedOptimizer`,
            or any other Keras optimizer, which is then wrapped in a
            ``DistributedOptimizer`` with its defaults.
        initial_scale: the first loss scale ``S`` (> 0; Keras's default 2**15).
        dynamic_growth_steps: finite steps in a row after which ``S`` doubles (>= 1).
        name: default ``"distributed_loss_scale_optimizer"``.

    Raises:
        ValueError: naming the argument: an inner optimizer that already does
            loss scaling, a wrapper chain that hides its DistributedOptimizer,
            a non-positive ``initial_scale`` or ``dynamic_growth_steps``.

    Example:
        >>> import keras  # doctest: +SKIP
        >>> from hvd_largebatch.tf import LARS, DistributedOptimizer, DistributedLossScaleOptimizer  # doctest: +SKIP
        >>> keras.mixed_precision.set_global_policy("mixed_float16")  # doctest: +SKIP
        >>> opt = DistributedLossScaleOptimizer(DistributedOptimizer(LARS(learning_rate=0.1)))  # doctest: +SKIP
        >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", jit_compile=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer,
        initial_scale: float = 2.0**15,
        dynamic_growth_steps: int = 2000,
        name: str | None = None,
        **kwargs: Any,
    ):
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise ValueError(f"inner_optimizer must be a keras.optimizers.Optimizer instance, got {inner_optimizer!r}")
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer) or isinstance(
            getattr(inner_optimizer, "inner_optimizer", None), keras.optimizers.LossScaleOptimizer
        ):
            raise ValueError("inner_optimizer already does loss scaling (a LossScaleOptimizer): pass the optimizer it wraps")
        initial_scale = config.check_positive("initial_scale", initial_scale)
        dynamic_growth_steps = config.check_positive_int("dynamic_growth_steps", dynamic_growth_steps)
        if not isinstance(inner_optimizer, DistributedOptimizer):
            if find_distributed_optimizer(inner_optimizer) is not None:
                raise ValueError(
                    "inner_optimizer must be the DistributedOptimizer itself (the averaging must come first), "
                    f"got {type(inner_optimizer).__name__} wrapping one"
                )
            inner_optimizer = DistributedOptimizer(inner_optimizer)
        inner_optimizer._distributed_loss_scaling = True  # lets LossScaleOptimizer.__init__ reset its factor
        super().__init__(
            inner_optimizer,
            initial_scale=initial_scale,
            dynamic_growth_steps=dynamic_growth_steps,
            name=name or "distributed_loss_scale_optimizer",
            **kwargs,
        )

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError("pass trainable_variables on the first apply(), or build the optimizer first")
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        self.inner_optimizer.average_then_update(grads, trainable_variables, self._decide_and_update)

    def _decide_and_update(self, averaged, variables) -> None:
        """The loss-scale step on the averaged (still scaled) gradients; identical on every rank."""
        ops.cond(
            self.check_finite(averaged),
            lambda: self._update_and_maybe_grow(averaged, variables),
            self._shrink,
        )

    def _update_and_maybe_grow(self, averaged, variables) -> None:
        scale = self.dynamic_scale
        unscaled = [
            g if self._overwrite_variable_with_gradient(v) else ops.divide(g, ops.cast(scale, g.dtype))
            for g, v in zip(averaged, variables)
        ]
        self.inner_optimizer.inner_optimizer.apply(unscaled, variables)
        grow = ops.equal(self.step_counter, self.dynamic_growth_steps - 1)
        ops.cond(grow, self._grow, self._count_finite_step)

    def _count_finite_step(self) -> None:
        self.step_counter.assign_add(1)

    def _grow(self) -> None:
        self.step_counter.assign(0)
        self.dynamic_scale.assign(self.dynamic_scale * 2.0)

    def _shrink(self) -> None:
        self.step_counter.assign(0)
        self.dynamic_scale.assign(self.dynamic_scale * 0.5)

    def apply_gradients(self, grads_and_vars):
        grads, variables = zip(*grads_and_vars)
        self.apply(grads, variables)
        return self.iterations

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise ValueError("DistributedLossScaleOptimizer works with the TensorFlow backend's stateful apply() only")
