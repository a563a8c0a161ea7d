"""Base class of the package's Keras 3 optimizers (SGD, LARS/LARC, CLARS, LAMB).

It holds what every rule shares and leaves the arithmetic to
:mod:`hvd_largebatch.tf.update_rules`:

* hyperparameters in Keras spelling (``learning_rate``, ``epsilon``,
  ``beta_1``), validated and defaulted by :mod:`hvd_largebatch.config`
  (which spells them ``lr``, ``eps``, ``beta1``);
* the *coupled* weight decay of ALGORITHMS.md (``d = g + beta * w`` inside
  the update): the Keras base class is given ``weight_decay=None`` so that it
  never adds its own decoupled decay on top;
* the two per-tensor switches (weight decay, layer adaptation), decided once
  in :meth:`build` from ``variable.path`` (e.g. ``"sequential/dense/kernel"``)
  by :func:`hvd_largebatch.config.resolve_exclusion`;
* the non-finite gradient policy: by default a step whose gradients hold NaN
  or Inf changes no weight and no slot and is counted in ``skipped_steps``.
  Under ``DistributedOptimizer`` the gradients are averaged before the
  optimizer sees them, so every rank takes the same decision;
* each variable once: ``build`` refuses a list holding a variable twice
  (its update would be applied twice) with a ``ValueError`` naming its path;
* float32 or float64 variables only: ``build`` refuses float16/bfloat16
  variables (the pure half policies) with a ``ValueError`` naming the
  ``mixed_float16``/``mixed_bfloat16`` policies, which keep variables, slots
  and the update math in float32 (:mod:`hvd_largebatch.tf.mixed_precision`);
* ``prev_learning_rate``, the LR of the last applied step, kept as an
  optimizer variable so that momentum correction survives save and load;
* ``fused``: whether norms and the weight steps use single-pass kernels
  (:mod:`hvd_largebatch.tf.fused_kernels`): TensorFlow's (True, the
  default), the package's own CPU kernels where they apply (``"native"``:
  compiled with the system C++ compiler on first use, TensorFlow's
  elsewhere), or ``keras.ops`` alone (False, :mod:`hvd_largebatch.tf.update_rules`);
  same math.

The update is done for all variables at once in :meth:`_backend_update_step`
(one traced function over every tensor: per-step scalars are computed on
vectors, elementwise work per tensor), which is why :meth:`update_step`, the
per-variable hook of Keras, is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import keras
import tensorflow as tf
from keras import ops

from hvd_largebatch import config, errors
from hvd_largebatch.tf import core_spelling, fused_kernels, update_rules
from hvd_largebatch.tf.mixed_precision import check_variable_dtypes

__all__ = ["LargeBatchOptimizer", "tensor_path", "tensor_of"]


def tensor_path(variable: Any) -> str:
    """The full path the exclusion rules match on (``variable.path``, else its name)."""
    return str(getattr(variable, "path", None) or variable.name)


def tensor_of(value: Any, dtype: str) -> Any:
    """``value`` as a tensor of ``dtype``, converted directly.

    ``keras.ops.cast(0.9, "float64")`` goes through float32 (Keras turns a
    Python float into a float32 tensor first) and is off by 2e-8; this is not.
    """
    if ops.is_tensor(value) or isinstance(value, keras.Variable):
        return ops.cast(value, dtype)
    return ops.convert_to_tensor(value, dtype=dtype)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or (type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0)


class LargeBatchOptimizer(keras.optimizers.Optimizer):
    """Shared bookkeeping of the package's optimizers; see the module docstring.

    Subclasses set ``core_name`` (a name of :data:`hvd_largebatch.config.OPTIMIZER_NAMES`),
    create their slots in :meth:`_build_slots` and implement :meth:`_batched_update`.

    Attributes:
        core_config: the validated :mod:`hvd_largebatch.config` record.
        weight_decay: the coupled weight decay ``beta`` (not Keras's decoupled one).
        weight_decay_exclusion, layer_adaptation_exclusion: the two
            :class:`hvd_largebatch.config.ExclusionRule`.
        fused: True (TensorFlow's single-pass kernels), ``"native"`` (the
            package's CPU kernels where they apply) or False (``keras.ops``).
        prev_learning_rate: variable, the LR of the last applied step (0 before the first).
        skipped_steps: variable, the number of steps skipped for non-finite gradients.
    """

    core_name: ClassVar[str] = ""
    #: Whether the rule has a layer-wise trust ratio (False for SGD).
    has_layer_adaptation: ClassVar[bool] = True

    def __init__(
        self,
        learning_rate: Any,
        hyperparameters: dict[str, Any],
        *,
        exclude_from_weight_decay: config.ExclusionSpec = None,
        exclude_from_layer_adaptation: config.ExclusionSpec = None,
        nonfinite: str = "skip",
        fused: bool | str = True,
        name: str | None = None,
        **kwargs: Any,
    ):
        core_spelling.refuse_other_spellings(type(self).__name__, kwargs)
        if not (isinstance(fused, bool) or fused == fused_kernels.NATIVE):
            raise ValueError(f"fused must be True, False or {fused_kernels.NATIVE!r}, got {fused!r}")
        core_fields = core_spelling.to_core(hyperparameters)
        if _is_number(learning_rate):
            core_fields["lr"] = learning_rate
        elif not callable(learning_rate):
            # Not the core's "lr must be a real number": Keras's learning_rate also takes schedules.
            raise ValueError(
                "learning_rate must be a number >= 0, a keras.optimizers.schedules.LearningRateSchedule "
                f"or a callable returning the LR; got {learning_rate!r}"
            )
        try:
            core_config = config.optimizer_config(self.core_name, nonfinite=nonfinite, **core_fields)
        except ValueError as err:
            raise core_spelling.error_in_keras_spelling(err) from None
        super().__init__(
            learning_rate=core_config.lr if _is_number(learning_rate) else learning_rate,
            weight_decay=None,  # ours is coupled and applied inside the update, see _apply_weight_decay
            name=name,
            **kwargs,
        )
        self.core_config = core_config
        self.weight_decay = core_config.weight_decay
        self.nonfinite = core_config.nonfinite
        self.fused = fused
        self._native_kernels = False  # set per trace in _backend_update_step
        self._squared_norm = fused_kernels.squared_norm if fused else update_rules.squared_norm
        self.weight_decay_exclusion = config.resolve_exclusion(exclude_from_weight_decay, "exclude_from_weight_decay")
        self.layer_adaptation_exclusion = config.resolve_exclusion(
            exclude_from_layer_adaptation, "exclude_from_layer_adaptation"
        )

    # ------------------------------------------------------------------ build
    def build(self, variables: Sequence[Any]) -> None:
        if self.built:
            return
        if tf.distribute.has_strategy():
            raise ValueError(
                f"{type(self).__name__} does not run under a tf.distribute strategy; "
                "use hvd_largebatch.tf.DistributedOptimizer with Horovod instead"
            )
        check_variable_dtypes(type(self).__name__, variables)
        self._refuse_duplicates(variables)
        super().build(variables)
        paths = [tensor_path(v) for v in variables]
        shapes = [tuple(v.shape) for v in variables]
        self._decay = [not self.weight_decay_exclusion(p, s) for p, s in zip(paths, shapes)]
        self._adapt = [
            self.has_layer_adaptation and not self.layer_adaptation_exclusion(p, s) for p, s in zip(paths, shapes)
        ]
        self._paths = paths
        dtypes = {keras.backend.standardize_dtype(v.dtype) for v in variables}
        self._scalar_dtype = "float64" if "float64" in dtypes else "float32"
        self.prev_learning_rate = self.add_variable(
            (), initializer="zeros", dtype=self._scalar_dtype, name="prev_learning_rate"
        )
        self.skipped_steps = self.add_variable((), initializer="zeros", dtype="int", name="skipped_steps")
        self._build_slots(variables)

    def _refuse_duplicates(self, variables: Sequence[Any]) -> None:
        """A variable listed twice would be updated twice per step: refused, naming its path and both positions."""
        first_index: dict[int, int] = {}
        for index, variable in enumerate(variables):
            key = self._var_key(variable)
            if key in first_index:
                first = f"{tensor_path(variable)!r} at var_list[{first_index[key]}]"
                raise errors.duplicate_tensor(first, f"var_list[{index}]", argument="var_list")
            first_index[key] = index

    def _build_slots(self, variables: Sequence[Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must create its slots")

    @property
    def tensor_switches(self) -> dict[str, dict[str, bool]]:
        """For every variable path, whether weight decay and the trust ratio apply (after build)."""
        if not self.built:
            raise ValueError("the switches are decided in build(): build the optimizer or call apply() first")
        return {p: {"decay": d, "adapt": a} for p, d, a in zip(self._paths, self._decay, self._adapt)}

    def exclude_from_weight_decay(self, var_list: Sequence[Any] | None = None, var_names: Sequence[str] | None = None):
        """Keras's API for excluding variables, mapped onto this optimizer's weight-decay rule.

        Replaces the rule given at construction with regexes: ``var_names``
        match anywhere in the path, ``var_list`` entries match their exact path.
        Must be called before the optimizer is built.
        """
        if self.built:
            raise ValueError("exclude_from_weight_decay() must be called before the optimizer is built")
        patterns = [re.escape(n) for n in var_names or ()]
        patterns += [f"^{re.escape(tensor_path(v))}$" for v in var_list or ()]
        self.weight_decay_exclusion = config.resolve_exclusion(patterns, "exclude_from_weight_decay")

    def _apply_weight_decay(self, variables: Sequence[Any]) -> None:
        """Disabled: the weight decay here is coupled (inside the update), never Keras's decoupled one."""

    def update_step(self, gradient, variable, learning_rate):
        raise NotImplementedError(
            f"{type(self).__name__} updates all variables in one batched step (the non-finite check and "
            "momentum correction are per step, not per variable): call apply() or apply_gradients()"
        )

    # ----------------------------------------------------------------- update
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """The whole update of one step over every variable (Keras calls this once per step)."""
        variables = list(trainable_variables)
        indices = [self._get_variable_index(v) for v in variables]
        grads = [ops.cast(ops.convert_to_tensor(g), v.dtype) for g, v in zip(grads, variables)]
        lr = ops.cast(learning_rate, self._scalar_dtype)
        # Decided per trace: our CPU kernels where asked for and they apply (fused_kernels.native_kernels_usable).
        self._native_kernels = self.fused == fused_kernels.NATIVE and fused_kernels.native_kernels_usable(variables)
        self._batched_update(grads, variables, indices, lr)

    def _batched_update(self, grads, variables, indices, lr) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement its update")

    def _decay_vector(self, indices) -> Any:
        """Boolean vector over ``indices``: where weight decay applies."""
        return ops.convert_to_tensor([self._decay[i] for i in indices], dtype="bool")

    def _adapt_vector(self, indices) -> Any:
        """Boolean vector over ``indices``: where the trust ratio applies."""
        return ops.convert_to_tensor([self._adapt[i] for i in indices], dtype="bool")

    def _decay_constants(self, indices, value: float, dtype: str) -> Any:
        """Vector over ``indices``: ``value`` where weight decay applies, else 0 (for the CPU kernels)."""
        return tensor_of([value if self._decay[i] else 0.0 for i in indices], dtype)

    def _stack_scalars(self, values) -> Any:
        return ops.stack([ops.cast(v, self._scalar_dtype) for v in values])

    def _guarded(self, finite, apply_fn, lr) -> None:
        """Runs ``apply_fn`` and records ``lr`` if ``finite``; else skips and counts the step (or raises).

        With ``nonfinite="raise"`` a non-finite step raises ``FloatingPointError``
        when running eagerly, and ``tf.errors.InvalidArgumentError`` (from
        ``tf.debugging.Assert``, same message) inside a ``tf.function``.
        """

        def apply_and_record():
            apply_fn()
            self.prev_learning_rate.assign(lr)

        if self.nonfinite == "raise":
            message = f"{self.name}: non-finite gradient (NaN or Inf); nonfinite='raise'"
            if tf.executing_eagerly():
                if not bool(finite):
                    raise FloatingPointError(message)
            else:
                tf.debugging.Assert(finite, [message])
            apply_and_record()
            return

        def skip():
            self.skipped_steps.assign_add(ops.cast(1, self.skipped_steps.dtype))
            return None

        ops.cond(finite, apply_and_record, skip)

    @staticmethod
    def _all_finite(vector) -> Any:
        return ops.all(ops.isfinite(vector))

    # ----------------------------------------------------------------- config
    def _keras_hyperparameters(self) -> dict[str, Any]:
        """The rule's hyperparameters in Keras spelling, for ``get_config``."""
        raise NotImplementedError(f"{type(self).__name__} must list its hyperparameters for get_config")

    def get_config(self) -> dict[str, Any]:
        cfg = super().get_config()
        cfg.update(self._keras_hyperparameters())
        cfg["weight_decay"] = self.weight_decay
        cfg["nonfinite"] = self.nonfinite
        cfg["fused"] = self.fused
        cfg["exclude_from_weight_decay"] = self.weight_decay_exclusion.to_config()
        if self.has_layer_adaptation:
            cfg["exclude_from_layer_adaptation"] = self.layer_adaptation_exclusion.to_config()
        return cfg
