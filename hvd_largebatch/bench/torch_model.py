"""The small 1-D CNN with BatchNorm used by the batch-size study and the examples (PyTorch).

The architecture, BatchNorm settings and initialisation law are written down in
:mod:`hvd_largebatch.bench.model_spec`; the Keras twin is
:func:`hvd_largebatch.bench.keras_model.mnist1d_convnet` (a test checks the two
agree). Weights keep PyTorch's default initialisation, which is the spec's law.
Parameter names are ``conv1.weight``, ``bn1.weight``, ..., ``fc.bias``.

Example:
    >>> import torch
    >>> from hvd_largebatch.bench.torch_model import MNIST1DConvNet, count_parameters
    >>> model = MNIST1DConvNet()
    >>> model(torch.zeros(8, 40)).shape, count_parameters(model)
    (torch.Size([8, 10]), 25322)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hvd_largebatch.bench import model_spec
from hvd_largebatch.bench.model_spec import DEFAULT_CHANNELS, NUM_CLASSES, SIGNAL_LENGTH

__all__ = ["MNIST1DConvNet", "count_parameters", "DEFAULT_CHANNELS"]


class MNIST1DConvNet(nn.Module):
    """Three Conv1d-BatchNorm-ReLU blocks and a linear classifier (:mod:`~hvd_largebatch.bench.model_spec`).

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
        channels, num_classes, signal_length = model_spec.check_architecture(channels, num_classes, signal_length)
        self.signal_length = signal_length
        in_channels = 1
        for index, (out_channels, kernel, stride) in enumerate(zip(channels, model_spec.KERNELS, model_spec.STRIDES), 1):
            conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
            self.add_module(f"conv{index}", conv)
            bn = nn.BatchNorm1d(out_channels, eps=model_spec.BN_EPSILON, momentum=model_spec.BN_NEW_STATISTICS_WEIGHT)
            self.add_module(f"bn{index}", bn)
            in_channels = out_channels
        self.fc = nn.Linear(model_spec.flattened_length(channels, signal_length), num_classes)

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
