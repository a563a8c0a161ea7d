"""The errors that both framework libraries raise for the same mistake, with one message each.

STYLE: the same mistake raises the same exception type with the same
message in PyTorch and Keras; the frameworks only fill in their own module
or function names.
"""

from __future__ import annotations

__all__ = [
    "HorovodNotInitialisedError",
    "plain_batchnorm_with_dual_bn",
    "duplicate_tensor",
    "wrapped_twice",
    "not_an_optimizer",
]


class HorovodNotInitialisedError(RuntimeError):
    """A distributed piece ran before ``hvd.init()``.

    A ``RuntimeError`` (the process is in the wrong state, no argument is bad),
    raised by ``hvd_largebatch.torch_impl`` and ``hvd_largebatch.tf`` alike.

    Args:
        horovod_module: the Horovod module to initialise, ``"horovod.torch"``
            or ``"horovod.tensorflow"``.

    Example:
        >>> str(HorovodNotInitialisedError("horovod.torch"))
        'Horovod is not initialised: call horovod.torch.init() before using the distributed pieces'
    """

    def __init__(self, horovod_module: str):
        super().__init__(f"Horovod is not initialised: call {horovod_module}.init() before using the distributed pieces")
        self.horovod_module = horovod_module


def plain_batchnorm_with_dual_bn(package: str, layer_names: list[str]) -> ValueError:
    """The error of ``ConAdv(dual_bn=True)`` on a model whose BatchNorm layers are plain.

    Both frameworks refuse instead of converting behind the user's back: the
    conversion builds new layers (and, in Keras, a new model), so an optimizer
    or a reference the user already holds would miss the auxiliary BatchNorm.

    Args:
        package: ``"hvd_largebatch.torch_impl"`` or ``"hvd_largebatch.tf"``.
        layer_names: the plain BatchNorm layers found (the first few are named).

    Example:
        >>> print(plain_batchnorm_with_dual_bn("hvd_largebatch.tf", ["bn1"]))
        dual_bn=True but the model has plain BatchNorm layers (bn1): convert it first with model = hvd_largebatch.tf.convert_to_dual_bn(model), before building the optimizer and ConAdv, or pass dual_bn=False
    """
    shown = ", ".join(layer_names[:3]) + (", ..." if len(layer_names) > 3 else "")
    return ValueError(
        f"dual_bn=True but the model has plain BatchNorm layers ({shown}): convert it first with "
        f"model = {package}.convert_to_dual_bn(model), before building the optimizer and ConAdv, "
        "or pass dual_bn=False"
    )


def duplicate_tensor(first: str, second: str, argument: str = "params") -> ValueError:
    """The error of an optimizer given the same tensor twice (within a param group or across groups).

    A repeated tensor would be updated once per occurrence in every step (and,
    with the fused paths, differently per path), so both frameworks refuse it.

    Args:
        first, second: the two places the tensor was found, e.g. its name and
            position ``'0.weight' at param_groups[0][0]``.
        argument: the argument that held the tensors: ``"params"`` (torch,
            the default) or ``"var_list"`` (Keras, which has no param groups).

    Example:
        >>> print(duplicate_tensor("'0.weight' at param_groups[0][0]", "param_groups[1][0]"))
        params: the same tensor is passed twice, as '0.weight' at param_groups[0][0] and as param_groups[1][0]; pass each tensor once, in one param group (a repeated tensor would be updated once per occurrence in every step)
    """
    groups = ", in one param group" if argument == "params" else ""
    return ValueError(
        f"{argument}: the same tensor is passed twice, as {first} and as {second}; pass each tensor once{groups} "
        "(a repeated tensor would be updated once per occurrence in every step)"
    )


def wrapped_twice() -> ValueError:
    """The error of a ``DistributedOptimizer`` given an optimizer that is already one (or wraps one).

    Example:
        >>> print(wrapped_twice())
        optimizer is already a DistributedOptimizer (or wraps one): wrap it only once
    """
    return ValueError("optimizer is already a DistributedOptimizer (or wraps one): wrap it only once")


def not_an_optimizer(expected: str, value: object) -> TypeError:
    """The error of a ``DistributedOptimizer`` given something that is not an optimizer of its framework.

    Args:
        expected: the class the framework wraps, e.g. ``"torch.optim.Optimizer"``.
        value: what the user passed (named by its class).

    Example:
        >>> print(not_an_optimizer("torch.optim.Optimizer", 3))
        optimizer must be a torch.optim.Optimizer instance, got builtins.int
    """
    kind = type(value)
    return TypeError(f"optimizer must be a {expected} instance, got {kind.__module__}.{kind.__qualname__}")
