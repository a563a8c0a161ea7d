"""ConAdv for Keras 3: a model wrapper whose ``train_step`` trains on clean and stale-weight adversarial data.

Concurrent adversarial learning (Liu, You et al., "Concurrent Adversarial
Learning for Large-Batch Training", ICLR 2022), as defined in ALGORITHMS.md::

    loss_t = mean CE(theta_t; x_t, y_t)                          # clean, main BN
           + adv_weight * mean CE(theta_t; xadv_t, y_t)          # auxiliary BN if dual_bn
    xadv_t = clip(x_t + delta0 - s * alpha * sign(grad_x CE(theta_{t-tau}; x_t + delta0, y')),
                  x_t - epsilon, x_t + epsilon, input_range)     # repeated attack_iters times

``s = +1`` and ``y'`` a random wrong label when ``targeted`` (descend toward
it, as the official code), ``s = -1`` and ``y' = y_t`` otherwise; ``delta0``
uniform in ``[-epsilon, epsilon]`` for each example with probability
``random_start_prob``, else 0. "CE" is the loss given to ``compile``.

Usage, with any optimizer but CLARS (the package's ``DistributedOptimizer`` under
``horovodrun``: the adversarial term is part of the gradient it averages)::

    base_model = convert_to_dual_bn(base_model)   # plain BatchNormalization is refused with dual_bn=True
    model = ConAdv(base_model, epsilon=0.1, step_size=0.1, staleness=1, dual_bn=True, input_range=None)
    model.compile(optimizer=DistributedOptimizer(LARS(learning_rate=1.0)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, batch_size=256, epochs=10)

How the train step does it:

* The stale weights are kept as non-trainable variables of the wrapper: a
  queue of ``tau`` snapshots ``[theta_{t-tau}, ..., theta_{t-1}]``, refreshed
  every step (shifted, then ``theta_t`` appended) *before* the optimizer
  updates ``theta_t``. The attack runs ``base_model.stateless_call`` on the
  oldest snapshot, so it never writes the model's state (BatchNorm moving
  statistics included). For ``t < tau`` there are no stale weights yet and
  ``theta_t`` is used; ``tau = 0`` is ordinary sequential adversarial training.
  The snapshots and the step counter are saved with the model and broadcast
  with it, so a resumed or multi-worker run continues exactly.
* Overlap: inside the step's ``tf.function`` the attack depends only on the
  batch and the snapshot, not on this step's clean forward and backward
  pass, so TensorFlow's executor runs the two branches concurrently; the
  adversarial forward/backward waits for the attack. Note the difference from
  the paper's (and our PyTorch helper's) overlap: Keras' ``train_step`` sees
  one batch, so the attack overlaps the clean half of the same step rather than
  the previous step's whole backward and allreduce; with ``tau = 0`` the graph
  has the same parallel structure, so on Keras the staleness reproduces the
  algorithm but does not buy extra overlap. Measured on the bench model
  (``benchmarks/conadv_step_time.py``, 2 cores, batch 256, 1 intra-op
  thread): ConAdv costs 2.1-2.2x a clean step with TensorFlow's inter-op pool
  at 1 (branches serialised) and 1.7x with 2.
* With ``dual_bn=True`` the adversarial forward passes (attack and training)
  go through the auxiliary BatchNorm; ``evaluate``/``predict``/``call`` use the
  main BatchNorm only. A base model with plain ``BatchNormalization`` layers is
  refused, as in PyTorch: convert it first with
  ``base_model = convert_to_dual_bn(base_model)``
  (:func:`~hvd_largebatch.tf.dual_bn.convert_to_dual_bn`, which returns a new
  model), so the object you hold is the one that trains.
* Random draws are stateless, seeded by ``(seed, t)``: reproducible, and not
  reset by a broadcast of the model's variables. Under Horovod pass a
  rank-dependent ``seed`` if you want different noise on each rank.
* Targeted mode needs classification labels: integer labels ``(N,)``/``(N, 1)``
  or one-hot ``(N, C)`` (one-hot when ``y`` has the prediction's rank and ``C``
  columns). The attack runs in training mode (BatchNorm on batch statistics),
  the mode of the loss term it feeds. ``random_start_prob`` applies per
  example (our reading of the paper).
* ``average_losses=True`` (ours; off by default, which is ALGORITHMS.md's
  sum) trains on the weighted mean of the two terms: with LARS/LAMB the sum
  doubles the steps of the tensors they do not adapt (biases, BatchNorm),
  which take the raw global LR (see the PyTorch module for the figures).
"""

from __future__ import annotations

import random
from typing import Any

import keras
import tensorflow as tf

from hvd_largebatch.config import ConAdvConfig, check_int_in_range
from hvd_largebatch.errors import plain_batchnorm_with_dual_bn
from hvd_largebatch.tf.distributed import innermost_optimizer
from hvd_largebatch.tf.dual_bn import auxiliary_bn, plain_bn_layers
from hvd_largebatch.tf.momentum_optimizers import CLARS

__all__ = ["ConAdv"]

_DEFAULTS = ConAdvConfig()


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class ConAdv(keras.Model):
    """Wraps ``base_model`` so that ``fit`` does concurrent adversarial learning (see the module docstring).

    Args:
        base_model: a Keras model mapping inputs to class scores (logits or
            probabilities, as the compiled loss expects). With ``dual_bn=True``
            its BatchNormalization layers must be dual (convert it first with
            :func:`~hvd_largebatch.tf.dual_bn.convert_to_dual_bn`); a model is
            built on the first batch if need be.
        epsilon, step_size, staleness, attack_iters, random_start_prob, targeted,
            adv_weight, dual_bn, input_range, average_losses: the ConAdv
            hyperparameters of ``hvd_largebatch.config.ConAdvConfig`` (same
            names, defaults and checks as the PyTorch helper);
            ``average_losses=True`` trains on the weighted mean
            ``(clean + adv_weight * adversarial) / (1 + adv_weight)``. ``input_range`` must contain the
            data; pass None for unbounded inputs such as standardised signals.
        seed: seed of the stateless random draws, in [0, 2**31); None picks one at
            random. Differs from PyTorch's ``seed >= 0`` because Keras's stateless
            random ops take int32 seeds.
        **kwargs: passed to ``keras.Model`` (e.g. ``name``).

    Attributes:
        base_model: the model being trained (the one given).
        conadv_config: the validated ``ConAdvConfig``.

    Raises:
        ValueError: a bad argument, naming it and the allowed values; also
            ``dual_bn=True`` with plain BatchNormalization layers (the message
            says how to convert, the same as PyTorch's).
    """

    def __init__(
        self,
        base_model: keras.Model,
        epsilon: float = _DEFAULTS.epsilon,
        step_size: float = _DEFAULTS.step_size,
        staleness: int = _DEFAULTS.staleness,
        attack_iters: int = _DEFAULTS.attack_iters,
        random_start_prob: float = _DEFAULTS.random_start_prob,
        targeted: bool = _DEFAULTS.targeted,
        adv_weight: float = _DEFAULTS.adv_weight,
        dual_bn: bool = _DEFAULTS.dual_bn,
        input_range: tuple[float, float] | None = _DEFAULTS.input_range,
        average_losses: bool = _DEFAULTS.average_losses,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        config = ConAdvConfig.from_arguments(locals())  # a deserialised list input_range becomes a tuple there
        if not isinstance(base_model, keras.Model):
            raise ValueError(f"base_model must be a keras.Model, got {type(base_model).__name__}")
        if seed is not None:
            seed = check_int_in_range("seed", seed, 0, 2**31)
        plain = plain_bn_layers(base_model)
        if config.dual_bn and plain:
            raise plain_batchnorm_with_dual_bn("hvd_largebatch.tf", [layer.name for layer in plain])
        super().__init__(**kwargs)
        self.conadv_config = config
        self.base_model = base_model
        self.seed = random.randrange(2**31) if seed is None else seed
        self._snapshots: list[list[keras.Variable]] = []
        self._state_created = False
        if base_model.built:
            self._create_state()

    # -- construction ------------------------------------------------------------------------
    def build(self, input_shape) -> None:
        if not self.base_model.built:
            self.base_model.build(input_shape)
        if not self._state_created:
            self._create_state()
        self.built = True

    def _create_state(self) -> None:
        live = self.base_model.trainable_variables
        for slot in range(self.conadv_config.staleness):
            self._snapshots.append(
                [
                    self.add_weight(
                        shape=variable.shape,
                        dtype=variable.dtype,
                        initializer="zeros",
                        trainable=False,
                        name=f"stale_{slot}_{variable.path.replace('/', '__')}",
                    )
                    for variable in live
                ]
            )
        self._step = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False, name="conadv_step")
        self._state_created = True
        self.built = True

    def call(self, inputs, training=None):
        """The base model with its main BatchNorm: what ``evaluate`` and ``predict`` use."""
        return self.base_model(inputs, training=training)

    # -- the ConAdv step -----------------------------------------------------------------------
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self._compile_loss is None:
            raise ValueError("ConAdv needs a loss: compile the model with loss=...")
        if isinstance(innermost_optimizer(self.optimizer), CLARS):
            raise ValueError(
                "ConAdv does not feed CLARS its per-example gradient norms in Keras (CLARSModel does, for "
                "clean training): use LARS, LARC, LAMB or SGD with ConAdv, or CLARS from the PyTorch helper"
            )
        if not self._state_created:  # a base model without an Input: build on the first batch
            self.build(tf.nest.map_structure(lambda tensor: tuple(tensor.shape), x))
        cfg = self.conadv_config
        step = self._step.value
        live = self.base_model.trainable_variables
        if cfg.staleness:
            attack_weights = tf.cond(
                step >= cfg.staleness,
                lambda: [variable.value for variable in self._snapshots[0]],
                lambda: [variable.value for variable in live],
            )
        else:
            attack_weights = [variable.value for variable in live]
        x_adv = self._adversarial_examples(attack_weights, x, y, step)

        with tf.GradientTape() as tape:
            y_pred = self.base_model(x, training=True)
            clean_loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            with auxiliary_bn(self.base_model, cfg.dual_bn):
                y_pred_adv = self.base_model(x_adv, training=True)
            adversarial_loss = self._compile_loss(y, y_pred_adv, sample_weight)
            loss = clean_loss + cfg.adv_weight * adversarial_loss
            if cfg.average_losses:
                loss = loss / (1 + cfg.adv_weight)
            batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
            self._loss_tracker.update_state(loss, sample_weight=batch_size)
            scaled_loss = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
        trainable = self.trainable_weights
        gradients = tape.gradient(scaled_loss, trainable)

        # Refresh the snapshots with theta_t before the optimizer moves it.
        for older, newer in zip(self._snapshots, self._snapshots[1:]):
            for target, source in zip(older, newer):
                target.assign(source.value)
        if self._snapshots:
            for target, source in zip(self._snapshots[-1], live):
                target.assign(source.value)
        self._step.assign_add(1)
        self.optimizer.apply_gradients(zip(gradients, trainable))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _adversarial_examples(self, weights: list, x, y, step):
        """The attack of the module docstring at ``weights``, via a stateless call (no state is written)."""
        cfg = self.conadv_config
        x0 = tf.convert_to_tensor(x)
        if not x0.dtype.is_floating:
            raise ValueError(f"ConAdv needs floating-point inputs, got dtype {x0.dtype.name}")
        # tf.constant, not tf.cast: casting a Python float goes through float32 first.
        eps = tf.constant(cfg.epsilon, x0.dtype)
        direction = tf.constant(-cfg.step_size if cfg.targeted else cfg.step_size, x0.dtype)
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])

        def clip(candidate):
            candidate = tf.clip_by_value(candidate, x0 - eps, x0 + eps)
            if cfg.input_range is not None:
                candidate = tf.clip_by_value(
                    candidate, tf.constant(cfg.input_range[0], x0.dtype), tf.constant(cfg.input_range[1], x0.dtype)
                )
            return candidate

        if cfg.random_start_prob > 0:
            batch = tf.shape(x0)[0]
            per_example = tf.concat([[batch], tf.ones([tf.rank(x0) - 1], tf.int32)], axis=0)
            starts = tf.random.stateless_uniform(per_example, _fold(seed, 0), dtype=x0.dtype) < cfg.random_start_prob
            noise = (tf.random.stateless_uniform(tf.shape(x0), _fold(seed, 1), dtype=x0.dtype) * 2 - 1) * eps
            x_adv = clip(x0 + noise * tf.cast(starts, x0.dtype))
        else:
            x_adv = x0
        non_trainable = [variable.value for variable in self.base_model.non_trainable_variables]
        target = y
        with auxiliary_bn(self.base_model, cfg.dual_bn):
            for iteration in range(cfg.attack_iters):
                with tf.GradientTape() as tape:
                    tape.watch(x_adv)
                    y_pred, _ = self.base_model.stateless_call(weights, non_trainable, x_adv, training=True)
                    if cfg.targeted and iteration == 0:
                        target = _random_wrong_labels(y, y_pred, _fold(seed, 2))
                    attack_loss = self._compile_loss(target, y_pred)
                grad = tape.gradient(attack_loss, x_adv)
                step_direction = tf.where(tf.math.is_finite(grad), tf.sign(grad), tf.zeros_like(grad))
                x_adv = clip(x_adv + direction * step_direction)
        return tf.stop_gradient(x_adv)

    # -- serialisation -------------------------------------------------------------------------
    def get_config(self) -> dict:
        cfg = self.conadv_config
        return {
            **super().get_config(),
            "base_model": keras.saving.serialize_keras_object(self.base_model),
            "epsilon": cfg.epsilon,
            "step_size": cfg.step_size,
            "staleness": cfg.staleness,
            "attack_iters": cfg.attack_iters,
            "random_start_prob": cfg.random_start_prob,
            "targeted": cfg.targeted,
            "adv_weight": cfg.adv_weight,
            "dual_bn": cfg.dual_bn,
            "input_range": None if cfg.input_range is None else list(cfg.input_range),
            "average_losses": cfg.average_losses,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> "ConAdv":
        config = dict(config)
        config["base_model"] = keras.saving.deserialize_keras_object(
            config["base_model"], custom_objects=custom_objects
        )
        return cls(**config)


def _fold(seed, value: int):
    return tf.random.experimental.stateless_fold_in(seed, value)


def _random_wrong_labels(y, y_pred, seed):
    """``(y + U{1..C-1}) mod C`` in the format of ``y`` (integer labels or one-hot rows)."""
    num_classes = y_pred.shape[-1]
    if num_classes is None or num_classes < 2:
        raise ValueError(f"targeted=True needs at least 2 classes, the model outputs {num_classes}")
    y = tf.convert_to_tensor(y)
    one_hot = y.shape.rank == y_pred.shape.rank and y.shape[-1] == num_classes
    if y.dtype.is_floating and not one_hot and y.shape.rank is not None and y.shape.rank > 2:
        raise ValueError(f"targeted=True needs class labels (N,), (N, 1) or one-hot (N, C); got shape {y.shape}")
    labels = tf.argmax(y, axis=-1) if one_hot else tf.reshape(tf.cast(y, tf.int64), [-1])
    shift = tf.random.stateless_uniform(tf.shape(labels), seed, minval=1, maxval=num_classes, dtype=tf.int64)
    target = (labels + shift) % num_classes
    if one_hot:
        return tf.one_hot(target, num_classes, dtype=y.dtype)
    return tf.reshape(tf.cast(target, y.dtype), tf.shape(y))
