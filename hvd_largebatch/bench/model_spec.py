"""The sweep's 1-D CNN written down once: layers, widths, BatchNorm settings, initialisation law.

Both model twins build exactly this network, :class:`hvd_largebatch.bench.torch_model.MNIST1DConvNet`
(PyTorch) and :func:`hvd_largebatch.bench.keras_model.mnist1d_convnet` (Keras 3), so that a
difference between the frameworks' sweep tables is not a difference of model. For an
input of shape ``(batch, 40)`` (an MNIST-1D signal), with the default widths::

    conv1  Conv1d(1 -> 32, kernel 5, stride 1, "same", no bias) -> bn1 -> ReLU   # length 40
    conv2  Conv1d(32 -> 64, kernel 3, stride 2, "same", no bias) -> bn2 -> ReLU  # length 20
    conv3  Conv1d(64 -> 64, kernel 3, stride 2, "same", no bias) -> bn3 -> ReLU  # length 10
    flatten -> fc Linear(640 -> 10)                                              # logits

"same" padding is ``kernel // 2`` on each side (odd kernels), so a stride-``s``
layer maps length ``L`` to ``ceil(L / s)``. Convolutions carry no bias because a
BatchNorm follows each one. BatchNorm uses ``eps = 1e-5`` and gives the new
batch statistics the weight 0.1 in the running averages (PyTorch's ``momentum=0.1``,
Keras's ``momentum=0.9``). Every kernel and the classifier bias are drawn from
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch's default). 25,322 trainable
scalars. The layer names (``conv1``, ``bn1``, ..., ``fc``) are what the
optimizers' exclusion rules see: by the default rule the BatchNorm scales and
offsets and the classifier bias are excluded from weight decay and layer adaptation.

Example::

    >>> check_architecture((32, 64, 64), 10, 40)
    ((32, 64, 64), 10, 40)
    >>> flattened_length((32, 64, 64), 40), parameter_count((32, 64, 64), 10, 40)
    (640, 25322)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hvd_largebatch.bench.data import NUM_CLASSES, SIGNAL_LENGTH
from hvd_largebatch.config import check_positive_int

__all__ = [
    "DEFAULT_CHANNELS",
    "KERNELS",
    "STRIDES",
    "BN_EPSILON",
    "BN_NEW_STATISTICS_WEIGHT",
    "NUM_CLASSES",
    "SIGNAL_LENGTH",
    "check_architecture",
    "output_length",
    "flattened_length",
    "init_bound",
    "parameter_count",
]

#: Output channels of the three convolutions.
DEFAULT_CHANNELS = (32, 64, 64)
#: Kernel sizes of the three convolutions (odd, so "same" padding is symmetric).
KERNELS = (5, 3, 3)
#: Strides of the three convolutions.
STRIDES = (1, 2, 2)
#: BatchNorm's epsilon.
BN_EPSILON = 1e-5
#: Weight of the new batch statistics in BatchNorm's running averages (torch ``momentum``; Keras ``1 - momentum``).
BN_NEW_STATISTICS_WEIGHT = 0.1


def check_architecture(
    channels: Sequence[int], num_classes: int, signal_length: int
) -> tuple[tuple[int, ...], int, int]:
    """Returns the checked ``(channels, num_classes, signal_length)``.

    Raises:
        ValueError: naming the argument when ``channels`` is not three positive
            integers or a size is not a positive integer.
    """
    channels = tuple(channels)
    if len(channels) != len(KERNELS):
        raise ValueError(f"channels must be three positive integers, got {channels!r}")
    channels = tuple(check_positive_int("channels", c) for c in channels)
    return channels, check_positive_int("num_classes", num_classes), check_positive_int("signal_length", signal_length)


def output_length(length: int, stride: int) -> int:
    """The length after a "same"-padded convolution of stride ``stride``: ``ceil(length / stride)``."""
    return -(-length // stride)


def flattened_length(channels: Sequence[int], signal_length: int) -> int:
    """The classifier's input size: last width times the length after the three convolutions."""
    length = signal_length
    for stride in STRIDES:
        length = output_length(length, stride)
    return channels[-1] * length


def init_bound(fan_in: int) -> float:
    """``1 / sqrt(fan_in)``: kernels and the classifier bias are drawn from ``U(-bound, bound)``."""
    return 1.0 / math.sqrt(fan_in)


def parameter_count(channels: Sequence[int], num_classes: int, signal_length: int) -> int:
    """Trainable scalars: conv kernels, BatchNorm scale and offset, classifier weight and bias."""
    count, in_channels = 0, 1
    for out_channels, kernel in zip(channels, KERNELS):
        count += in_channels * out_channels * kernel + 2 * out_channels
        in_channels = out_channels
    return count + flattened_length(channels, signal_length) * num_classes + num_classes
