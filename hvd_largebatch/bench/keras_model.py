"""The small 1-D CNN with BatchNorm used by the batch-size sweep and the examples (Keras 3).

The same network as ``hvd_largebatch.torch_impl.models.MNIST1DConvNet``:
same layers, same trainable-parameter count (25,322 for the default widths; a
test checks the two agree) and the same initialisation law. Keras works
channels-last, so the flattened features are ordered (position, channel)
rather than PyTorch's (channel, position); the count and the function class
are the same.

Architecture, for an input of shape ``(batch, 40)``::

    Reshape (40, 1)
    conv1  Conv1D(32, kernel 5, stride 1, "same", no bias) -> bn1 -> ReLU   # length 40
    conv2  Conv1D(64, kernel 3, stride 2, "same", no bias) -> bn2 -> ReLU   # length 20
    conv3  Conv1D(64, kernel 3, stride 2, "same", no bias) -> bn3 -> ReLU   # length 10
    Flatten -> fc Dense(10)                                                 # logits

BatchNorm: ``epsilon=1e-5``, ``momentum=0.9`` (Keras's moving-average weight
of the old value; PyTorch's 0.1). Initialisation as PyTorch's default:
kernels ``VarianceScaling(1/3, "fan_in", "uniform")``, i.e.
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and the classifier bias uniform in the
same range (Keras's defaults would be Glorot and zeros).

Variable paths (``conv1/kernel``, ``bn1/gamma``, ``fc/bias``, ...) are what
the optimizers' exclusion rules see.

Example:
    >>> from hvd_largebatch.tf.models import mnist1d_convnet
    >>> model = mnist1d_convnet()
    >>> model.count_params() - sum(int(v.numpy().size) for v in model.non_trainable_weights)
    25322
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from hvd_largebatch.data import NUM_CLASSES, SIGNAL_LENGTH

__all__ = ["mnist1d_convnet", "count_parameters", "DEFAULT_CHANNELS"]

#: Output channels of the three convolutions (as the PyTorch model).
DEFAULT_CHANNELS = (32, 64, 64)
_KERNELS = (5, 3, 3)
_STRIDES = (1, 2, 2)


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
    """Builds the 1-D CNN (see the module docstring) as a functional ``keras.Model``.

    Args:
        channels: output channels of the three convolutions.
        num_classes: classifier outputs (logits, no softmax).
        signal_length: input length (MNIST-1D: 40).
        seed: seed of the initialisers (None: Keras's global seed state).
        name: the model's name.

    Raises:
        ValueError: naming the argument when a width or length is not a positive integer.
    """
    channels = tuple(channels)
    if len(channels) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"channels must be three positive integers, got {channels!r}")
    for arg, value in (("num_classes", num_classes), ("signal_length", signal_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")

    def layer_seed(index: int) -> int | None:
        return None if seed is None else seed * 100 + index

    inputs = keras.Input(shape=(signal_length,), name="signal")
    x = keras.layers.Reshape((signal_length, 1), name="add_channel")(inputs)
    length = signal_length
    for index, (filters, kernel, stride) in enumerate(zip(channels, _KERNELS, _STRIDES), start=1):
        x = keras.layers.Conv1D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer=_torch_default_kernel_initializer(layer_seed(index)),
            name=f"conv{index}",
        )(x)
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{index}")(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
        length = -(-length // stride)
    x = keras.layers.Flatten(name="flatten")(x)
    fan_in = channels[-1] * length
    bound = 1.0 / math.sqrt(fan_in)
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
