"""The errors that both framework libraries raise for the same mistake, with one message each.

STYLE: the same mistake raises the same exception type with the same
message in PyTorch and Keras; the frameworks only fill in their own module
or function names.
"""

from __future__ import annotations

__all__ = ["HorovodNotInitialisedError", "plain_batchnorm_with_dual_bn"]


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
