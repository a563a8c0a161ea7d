"""Dual BatchNorm for ConAdv in PyTorch: main statistics for clean data, auxiliary ones for adversarial data.

AdvProp (Xie et al., CVPR 2020) and ConAdv (Liu, You et al., ICLR 2022) route
adversarial examples through an *auxiliary* BatchNorm so that the clean
examples' batch statistics, and the running statistics used at evaluation,
never see the adversarial distribution. This module gives:

* :class:`DualBatchNorm1d`, :class:`DualBatchNorm2d`, :class:`DualBatchNorm3d`:
  subclasses of the ``torch.nn`` BatchNorm classes. The layer's own parameters
  and buffers are the *main* BatchNorm (same ``state_dict`` keys as the plain
  layer: ``bn1.weight``, ``bn1.running_mean``, ...); a child ``aux`` holds the
  auxiliary BatchNorm (``bn1.aux.weight``, ``bn1.aux.running_mean``, ...), with
  its own affine parameters and statistics, as in AdvProp.
* :func:`convert_to_dual_bn`: turns every ``BatchNorm1d/2d/3d`` of a user's
  model into its dual form, in place, keeping the main parameters as the very
  same ``Parameter`` objects and starting ``aux`` as an exact copy.
* :func:`convert_from_dual_bn`: the inverse, for deployment (drops ``aux``).
* :func:`auxiliary_bn`: a context manager that routes a model's dual layers
  through ``aux`` (the default route is main, so ``eval()``/inference and any
  code that does not know about ConAdv use the main BatchNorm only).

Convert *before* building the optimizer, so that the auxiliary parameters are
optimized too (an optimizer built earlier holds the main parameters only).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hvd_largebatch.torch_impl.dual_bn import convert_to_dual_bn, auxiliary_bn
    >>> model = convert_to_dual_bn(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    >>> sorted(k for k in model.state_dict() if k.startswith("1.") and "weight" in k)
    ['1.aux.weight', '1.weight']
    >>> with auxiliary_bn(model):
    ...     _ = model(torch.randn(8, 4))          # updates 1.aux.running_mean only
    >>> bool(model[1].running_mean.abs().sum() == 0)
    True
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from hvd_largebatch.dual_bn_routing import routed_to_auxiliary

__all__ = [
    "DualBatchNorm1d",
    "DualBatchNorm2d",
    "DualBatchNorm3d",
    "convert_to_dual_bn",
    "convert_from_dual_bn",
    "auxiliary_bn",
    "dual_bn_layers",
    "plain_bn_layers",
]

_PLAIN_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _DualBatchNormMixin:
    """Shared behaviour of the dual layers: ``forward`` follows ``use_auxiliary``."""

    aux: nn.Module
    use_auxiliary: bool

    def _init_dual(self, main: nn.Module) -> None:
        # The auxiliary BatchNorm starts as an exact copy of the main one.
        self.aux = copy.deepcopy(main)
        self.use_auxiliary = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's own argument name
        if self.use_auxiliary:
            return self.aux(input)
        return super().forward(input)  # type: ignore[misc]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dual (main + aux)"  # type: ignore[misc]


class DualBatchNorm1d(_DualBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose ``aux`` child normalises adversarial examples.

    Same arguments as ``nn.BatchNorm1d``. ``forward`` uses the main statistics
    unless ``use_auxiliary`` is True (set by :func:`auxiliary_bn`).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_dual(nn.BatchNorm1d(*args, **kwargs))


class DualBatchNorm2d(_DualBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with an auxiliary BatchNorm ``aux`` (see :class:`DualBatchNorm1d`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_dual(nn.BatchNorm2d(*args, **kwargs))


class DualBatchNorm3d(_DualBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with an auxiliary BatchNorm ``aux`` (see :class:`DualBatchNorm1d`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_dual(nn.BatchNorm3d(*args, **kwargs))


_DUAL_OF = {nn.BatchNorm1d: DualBatchNorm1d, nn.BatchNorm2d: DualBatchNorm2d, nn.BatchNorm3d: DualBatchNorm3d}
_DUAL_BN_TYPES = tuple(_DUAL_OF.values())


def _dual_from_plain(bn: nn.Module) -> nn.Module:
    dual_type = _DUAL_OF[type(bn)]
    dual = dual_type.__new__(dual_type)
    nn.Module.__init__(dual)
    # Adopt the plain layer's attributes, parameters and buffers as they are: the
    # main BatchNorm keeps the same Parameter objects (an optimizer or Horovod
    # hook that already holds them keeps working) and the same state_dict keys.
    dual.__dict__.update({k: v for k, v in bn.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
    dual._parameters = dict(bn._parameters)
    dual._buffers = dict(bn._buffers)
    dual._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    dual._modules = dict(bn._modules)
    dual._init_dual(bn)
    return dual


def _plain_from_dual(dual: nn.Module) -> nn.Module:
    plain_type = next(plain for plain, d in _DUAL_OF.items() if isinstance(dual, d))
    plain = plain_type.__new__(plain_type)
    nn.Module.__init__(plain)
    plain.__dict__.update(
        {k: v for k, v in dual.__dict__.items() if k not in ("_parameters", "_buffers", "_modules", "use_auxiliary")}
    )
    plain._parameters = dict(dual._parameters)
    plain._buffers = dict(dual._buffers)
    plain._non_persistent_buffers_set = set(dual._non_persistent_buffers_set)
    plain._modules = {k: v for k, v in dual._modules.items() if k != "aux"}
    return plain


def _replace_modules(module: nn.Module, match: tuple[type, ...], build, exact_type: bool) -> nn.Module:
    def matches(m: nn.Module) -> bool:
        return type(m) in match if exact_type else isinstance(m, match)

    if matches(module):
        return build(module)
    for name, child in list(module.named_children()):
        new_child = _replace_modules(child, match, build, exact_type)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_to_dual_bn(model: nn.Module) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d`` of ``model`` by its dual form, in place.

    The main BatchNorm of each converted layer keeps the original parameters
    and buffers (same objects, same ``state_dict`` keys); the auxiliary one is
    a copy, so the converted model computes exactly what the original did until
    adversarial batches train ``aux``. Subclasses of the BatchNorm classes,
    ``SyncBatchNorm`` and lazy BatchNorm are left alone (convert those by hand).
    Layers that are already dual are left as they are.

    Args:
        model: any ``nn.Module``; if it is itself a BatchNorm, the dual layer is returned.

    Returns:
        ``model`` (or its replacement when ``model`` is a BatchNorm).

    Raises:
        ValueError: if ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _replace_modules(model, _PLAIN_BN_TYPES, _dual_from_plain, exact_type=True)


def convert_from_dual_bn(model: nn.Module) -> nn.Module:
    """Turns every dual BatchNorm of ``model`` back into a plain one (main statistics), in place.

    Use it to deploy a model trained with ConAdv: the result has the original
    architecture and ``state_dict`` keys; the auxiliary BatchNorms are dropped.

    Raises:
        ValueError: if ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _replace_modules(model, _DUAL_BN_TYPES, _plain_from_dual, exact_type=False)


def dual_bn_layers(model: nn.Module) -> list[nn.Module]:
    """The dual BatchNorm layers of ``model``, in ``modules()`` order."""
    return [m for m in model.modules() if isinstance(m, _DUAL_BN_TYPES)]


def plain_bn_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers of ``model`` that are not dual (``aux`` children excluded)."""
    auxiliaries = {id(m.aux) for m in dual_bn_layers(model)}
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, _DUAL_BN_TYPES)
        and id(m) not in auxiliaries
    ]


@contextlib.contextmanager
def auxiliary_bn(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Routes ``model``'s dual BatchNorm layers through their auxiliary statistics inside the block.

    The previous routing is restored on exit, also on error. ``enabled=False``
    makes the block a no-op, which keeps call sites free of branches. Not
    thread-safe for one model shared between threads: ConAdv's background
    attack uses its own snapshot copy of the model.

    Args:
        model: a model converted with :func:`convert_to_dual_bn` (a model
            without dual layers is accepted and left unchanged).
        enabled: whether to switch to the auxiliary statistics.
    """
    with routed_to_auxiliary(dual_bn_layers(model) if enabled else []):
        yield model
