"""The small 1-D CNN with BatchNorm used by the batch-size sweep and the examples (PyTorch).

The same network exists for Keras in ``hvd_largebatch.tf.models``; both have
the same layers, the same trainable-parameter count (25,322 for the default
widths; a test checks the two agree) and the same initialisation law, so that
a difference between the frameworks' sweep tables is not a difference of model.

Architecture, for an input of shape ``(batch, 40)`` (an MNIST-1D signal)::

    conv1  Conv1d(1 -> 32, kernel 5, stride 1, pad 2, no bias) -> bn1 -> ReLU   # length 40
    conv2  Conv1d(32 -> 64, kernel 3, stride 2, pad 1, no bias) -> bn2 -> ReLU  # length 20
    conv3  Conv1d(64 -> 64, kernel 3, stride 2, pad 1, no bias) -> bn3 -> ReLU  # length 10
    flatten -> fc Linear(640 -> 10)                                             # logits

Convolutions carry no bias because a BatchNorm follows each one. BatchNorm
uses ``eps=1e-5`` and running-average momentum 0.1 (Keras spelling: 0.9).
Weights use PyTorch's default initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
for every kernel and the classifier bias, which the Keras model reproduces.

Parameter names (``conv1.weight``, ``bn1.weight``, ``fc.bias``, ...) are what
the optimizers' exclusion rules see: by the default rule the BatchNorm scales
and offsets and the classifier bias are excluded from weight decay and from
layer adaptation.

Example:
    >>> import torch
    >>> from hvd_largebatch.torch_impl.models import MNIST1DConvNet, count_parameters
    >>> model = MNIST1DConvNet()
    >>> model(torch.zeros(8, 40)).shape, count_parameters(model)
    (torch.Size([8, 10]), 25322)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hvd_largebatch.data import NUM_CLASSES, SIGNAL_LENGTH

__all__ = ["MNIST1DConvNet", "count_parameters", "DEFAULT_CHANNELS"]

#: Output channels of the three convolutions.
DEFAULT_CHANNELS = (32, 64, 64)
_KERNELS = (5, 3, 3)
_STRIDES = (1, 2, 2)


def _conv_output_length(length: int, kernel: int, stride: int) -> int:
    padding = kernel // 2
    return (length + 2 * padding - kernel) // stride + 1


class MNIST1DConvNet(nn.Module):
    """Three Conv1d-BatchNorm-ReLU blocks and a linear classifier (see the module docstring).

    Args:
        channels: output channels of the three convolutions.
        num_classes: classifier outputs.
        signal_length: input length (MNIST-1D: 40).

    Raises:
        ValueError: naming the argument when a width or length is not a positive integer.
    """

    def __init__(
        self,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        num_classes: int = NUM_CLASSES,
        signal_length: int = SIGNAL_LENGTH,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if len(channels) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"channels must be three positive integers, got {channels!r}")
        for name, value in (("num_classes", num_classes), ("signal_length", signal_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.signal_length = signal_length
        in_channels, length = 1, signal_length
        for index, (out_channels, kernel, stride) in enumerate(zip(channels, _KERNELS, _STRIDES), start=1):
            conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
            self.add_module(f"conv{index}", conv)
            self.add_module(f"bn{index}", nn.BatchNorm1d(out_channels, eps=1e-5, momentum=0.1))
            in_channels, length = out_channels, _conv_output_length(length, kernel, stride)
        self.fc = nn.Linear(in_channels * length, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened output of the convolutional blocks, shape ``(batch, 640)``."""
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (batch, length) -> (batch, 1 channel, length)
        for index in (1, 2, 3):
            conv, bn = getattr(self, f"conv{index}"), getattr(self, f"bn{index}")
            x = torch.relu(bn(conv(x)))
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, num_classes)`` for signals of shape ``(batch, 40)``."""
        return self.fc(self.features(x))


def count_parameters(model: nn.Module) -> int:
    """The number of trainable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
