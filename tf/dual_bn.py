"""Dual BatchNorm for ConAdv in Keras 3: main statistics for clean data, auxiliary ones for adversarial data.

AdvProp (Xie et al., CVPR 2020) and ConAdv (Liu, You et al., ICLR 2022) route
adversarial examples through an *auxiliary* BatchNorm, so that the clean batch
statistics and the moving statistics used at evaluation never see the
adversarial distribution. This module gives:

* :class:`DualBatchNormalization`: a layer holding two
  ``keras.layers.BatchNormalization`` sub-layers, ``main`` and ``auxiliary``
  (each with its own gamma, beta and moving statistics, as in AdvProp). It
  calls ``main`` unless :func:`auxiliary_bn` is active, so ``evaluate``,
  ``predict`` and any code unaware of ConAdv use the main BatchNorm only.
  Both sets are weights of the model: ``model.save()`` / ``load_model`` keep them.
* :func:`convert_to_dual_bn`: a copy of a Functional or Sequential model in
  which every ``BatchNormalization`` is a ``DualBatchNormalization`` (same
  layer name; both sets start as copies of the original weights, so the copy
  computes exactly what the original does). Nested Functional/Sequential
  models are converted too. Subclassed models cannot be cloned by Keras:
  build them with ``DualBatchNormalization`` directly.
* :func:`convert_from_dual_bn`: the inverse, for deployment.
* :func:`auxiliary_bn`: a context manager that routes a model's dual layers
  through ``auxiliary``. The switch is read when a layer is *called*, so in a
  ``tf.function`` it takes effect at trace time; ConAdv's ``train_step`` uses
  it around the adversarial forward passes only.

Example:
    >>> import keras
    >>> from hvd_largebatch.tf.dual_bn import convert_to_dual_bn, DualBatchNormalization
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(name="bn")])
    >>> dual = convert_to_dual_bn(model)
    >>> isinstance(dual.get_layer("bn"), DualBatchNormalization)
    True
    >>> sorted(v.path.split("/bn/")[-1] for v in dual.get_layer("bn").weights if v.name == "gamma")
    ['auxiliary/gamma', 'main/gamma']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
from keras.src.models.functional import Functional  # Keras 3 has no public name for this class

from hvd_largebatch.dual_bn_routing import routed_to_auxiliary

__all__ = [
    "DualBatchNormalization",
    "convert_to_dual_bn",
    "convert_from_dual_bn",
    "auxiliary_bn",
    "dual_bn_layers",
    "plain_bn_layers",
]

# BatchNormalization arguments that a DualBatchNormalization forwards to both sub-layers.
_BN_ARGUMENTS = (
    "axis",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
)


@keras.saving.register_keras_serializable(package="hvd_largebatch")
class DualBatchNormalization(keras.layers.Layer):
    """Two BatchNormalizations, ``main`` (clean data, evaluation) and ``auxiliary`` (adversarial data).

    Takes the arguments of ``keras.layers.BatchNormalization`` (except
    ``renorm`` and ``synchronized``, which are not supported) and passes them
    to both sub-layers. Weight paths are ``<name>/main/gamma``,
    ``<name>/auxiliary/moving_mean``, ...; both are excluded from weight decay
    and layer adaptation by the package's default rule (1-D tensors).
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        bn_arguments = dict(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
        )
        self.main = keras.layers.BatchNormalization(name="main", dtype=self.dtype_policy, **bn_arguments)
        self.auxiliary = keras.layers.BatchNormalization(name="auxiliary", dtype=self.dtype_policy, **bn_arguments)
        self.use_auxiliary = False
        self.supports_masking = True

    def build(self, input_shape) -> None:
        self.main.build(input_shape)
        self.auxiliary.build(input_shape)
        self.built = True

    def call(self, inputs, training=None, mask=None):
        layer = self.auxiliary if self.use_auxiliary else self.main
        return layer(inputs, training=training, mask=mask)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        main_config = self.main.get_config()
        return {**super().get_config(), **{key: main_config[key] for key in _BN_ARGUMENTS}}


def _bn_arguments(layer: keras.layers.BatchNormalization) -> dict:
    config = layer.get_config()
    if config.get("renorm") or config.get("synchronized"):
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} uses renorm or synchronized=True, "
            "which DualBatchNormalization does not support"
        )
    return {key: config[key] for key in _BN_ARGUMENTS}


def dual_bn_layers(model: keras.layers.Layer) -> list[DualBatchNormalization]:
    """The ``DualBatchNormalization`` layers of ``model``, nested models included."""
    return [layer for layer in _all_layers(model) if isinstance(layer, DualBatchNormalization)]


def plain_bn_layers(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """``BatchNormalization`` layers of ``model`` that are not part of a dual layer."""
    inner = {id(sub) for dual in dual_bn_layers(model) for sub in (dual.main, dual.auxiliary)}
    return [
        layer
        for layer in _all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in inner
    ]


def _all_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    return list(layer._flatten_layers(include_self=True, recursive=True))


def _check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
    if not isinstance(model, (keras.Sequential, Functional)):
        raise ValueError(
            f"model must be a Functional or Sequential keras.Model to be converted (got a subclassed "
            f"{type(model).__name__}): build it with hvd_largebatch.tf.DualBatchNormalization layers instead"
        )
    if not model.built:
        raise ValueError("model must be built (give it an Input or call it once) before conversion")


def _copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies weights layer by layer, matched by name, into the converted or reverted ``target``."""
    for layer in source.layers:
        if not layer.weights:  # input layers (which clone_model renames) and stateless layers
            continue
        counterpart = target.get_layer(layer.name)
        if isinstance(layer, keras.Model) and not isinstance(counterpart, (DualBatchNormalization,)):
            _copy_weights(layer, counterpart)
        elif isinstance(counterpart, DualBatchNormalization) and not isinstance(layer, DualBatchNormalization):
            counterpart.main.set_weights(layer.get_weights())
            counterpart.auxiliary.set_weights(layer.get_weights())
        elif isinstance(layer, DualBatchNormalization) and not isinstance(counterpart, DualBatchNormalization):
            counterpart.set_weights(layer.main.get_weights())
        else:
            counterpart.set_weights(layer.get_weights())


def _default_clone(layer: keras.layers.Layer) -> keras.layers.Layer:
    return layer.__class__.from_config(layer.get_config())


def convert_to_dual_bn(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose ``BatchNormalization`` layers are ``DualBatchNormalization``.

    Both BatchNorm sets of each converted layer start with the original
    layer's weights; every other weight is copied, so the copy's outputs equal
    the original's. The original model is left as it is (it is not the one
    that trains afterwards). Layers that are already dual are kept as they are.

    Raises:
        ValueError: ``model`` is not a built Functional or Sequential model, or
            has a BatchNormalization with ``renorm`` or ``synchronized``.
    """
    _check_model(model)

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if type(layer) is keras.layers.BatchNormalization:
            return DualBatchNormalization(name=layer.name, dtype=layer.dtype_policy, **_bn_arguments(layer))
        return _default_clone(layer)

    converted = keras.models.clone_model(model, clone_function=clone, recursive=True)
    _copy_weights(model, converted)
    return converted


def convert_from_dual_bn(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with plain ``BatchNormalization`` layers holding the main statistics.

    Raises:
        ValueError: ``model`` is not a built Functional or Sequential model.
    """
    _check_model(model)

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, DualBatchNormalization):
            config = layer.get_config()
            return keras.layers.BatchNormalization(
                name=layer.name, dtype=layer.dtype_policy, **{key: config[key] for key in _BN_ARGUMENTS}
            )
        return _default_clone(layer)

    reverted = keras.models.clone_model(model, clone_function=clone, recursive=True)
    _copy_weights(model, reverted)
    return reverted


@contextlib.contextmanager
def auxiliary_bn(model: keras.layers.Layer, enabled: bool = True) -> Iterator[keras.layers.Layer]:
    """Routes ``model``'s dual layers through their ``auxiliary`` BatchNorm inside the block.

    Restores the previous routing on exit. ``enabled=False`` makes it a no-op.
    """
    with routed_to_auxiliary(dual_bn_layers(model) if enabled else []):
        yield model
