"""The small 1-D CNN with BatchNorm used by the batch-size study and the examples (Keras 3).

The architecture, BatchNorm settings and initialisation law are written down in
:mod:`hvd_largebatch.bench.model_spec`; the PyTorch twin is
:class:`hvd_largebatch.bench.torch_model.MNIST1DConvNet` (a test checks the two
agree). Keras works channels-last, so the flattened features are ordered
(position, channel) rather than PyTorch's (channel, position); the count and the
function class are the same. Keras's defaults (Glorot kernels, zero bias) are
replaced by the spec's ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and BatchNorm's
``momentum`` is Keras's weight of the old value (0.9 here, PyTorch's 0.1).
Variable paths are ``conv1/kernel``, ``bn1/gamma``, ..., ``fc/bias``.

Example:
    >>> from hvd_largebatch.bench.keras_model import mnist1d_convnet
    >>> model = mnist1d_convnet()
    >>> model.count_params() - sum(int(v.numpy().size) for v in model.non_trainable_weights)
    25322
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from hvd_largebatch.bench import model_spec
from hvd_largebatch.bench.model_spec import DEFAULT_CHANNELS, NUM_CLASSES, SIGNAL_LENGTH

__all__ = ["mnist1d_convnet", "count_parameters", "DEFAULT_CHANNELS"]


def _torch_default_kernel_initializer(seed: int | None) -> keras.initializers.Initializer:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's default for Conv and Linear weights."""
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed)


def mnist1d_convnet(
    channels: Sequence[int] = DEFAULT_CHANNELS,
    num_classes: int = NUM_CLASSES,
    signal_length: int = SIGNAL_LENGTH,
    *,
    seed: int | None = None,
    name: str = "mnist1d_convnet",
) -> keras.Model:
    """Builds the 1-D CNN of :mod:`~hvd_largebatch.bench.model_spec` as a functional ``keras.Model``.

    Args:
        channels: output channels of the three convolutions.
        num_classes: classifier outputs (logits, no softmax).
        signal_length: input length (MNIST-1D: 40).
        seed: seed of the initialisers (None: Keras's global seed state).
        name: the model's name.

    Raises:
        ValueError: naming the argument when a width or length is not a positive integer.
    """
    channels, num_classes, signal_length = model_spec.check_architecture(channels, num_classes, signal_length)

    def layer_seed(index: int) -> int | None:
        return None if seed is None else seed * 100 + index

    inputs = keras.Input(shape=(signal_length,), name="signal")
    x = keras.layers.Reshape((signal_length, 1), name="add_channel")(inputs)
    for index, (filters, kernel, stride) in enumerate(zip(channels, model_spec.KERNELS, model_spec.STRIDES), start=1):
        x = keras.layers.Conv1D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer=_torch_default_kernel_initializer(layer_seed(index)),
            name=f"conv{index}",
        )(x)
        x = keras.layers.BatchNormalization(
            momentum=1.0 - model_spec.BN_NEW_STATISTICS_WEIGHT, epsilon=model_spec.BN_EPSILON, name=f"bn{index}"
        )(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    bound = model_spec.init_bound(model_spec.flattened_length(channels, signal_length))
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=_torch_default_kernel_initializer(layer_seed(4)),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound, seed=layer_seed(5)),
        name="fc",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def count_parameters(model: keras.Model) -> int:
    """The number of trainable scalars (BatchNorm moving statistics are not counted)."""
    return sum(int(math.prod(v.shape)) for v in model.trainable_weights)
