"""Access to ``horovod.tensorflow`` for the Keras glue, imported only when first needed.

Only ``horovod.tensorflow`` ops are used: Horovod's own Keras integration
(``horovod.tensorflow.keras``) is broken on Keras 3 (see DESIGN.md). The
optimizers of this package work without Horovod installed; the distributed
pieces call :func:`initialized_horovod` when they first run.
"""

from __future__ import annotations

from types import ModuleType

from hvd_largebatch.errors import HorovodNotInitialisedError

__all__ = ["initialized_horovod", "horovod_is_running", "refuse_xla"]


def _import_horovod() -> ModuleType:
    try:
        import horovod.tensorflow as hvd
    except ImportError as err:  # pragma: no cover - the project's setup always builds Horovod
        raise ImportError(
            "hvd_largebatch.tf's distributed pieces need Horovod built with TensorFlow "
            "(run `make setup`, which builds horovod==0.28.1)"
        ) from err
    return hvd


def initialized_horovod() -> ModuleType:
    """``horovod.tensorflow``, after checking that ``hvd.init()`` was called.

    Raises:
        HorovodNotInitialisedError: a ``RuntimeError``, as in ``hvd_largebatch.torch_impl``.
    """
    hvd = _import_horovod()
    if not hvd.is_initialized():
        raise HorovodNotInitialisedError("horovod.tensorflow")
    return hvd


def horovod_is_running() -> bool:
    """True when ``horovod.tensorflow`` is importable and initialised."""
    try:
        hvd = _import_horovod()
    except ImportError:
        return False
    return bool(hvd.is_initialized())


def refuse_xla(what: str) -> None:
    """Raises a clear error when called while tracing a ``jit_compile=True`` function.

    Horovod's TensorFlow ops have no XLA kernels, so an allreduce inside an
    XLA-compiled train step would fail with a graph-compilation traceback.

    Raises:
        ValueError: naming ``what`` and the fix (``jit_compile=False``).
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - present in every TF 2 release
        return
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        raise ValueError(
            f"{what} cannot run under XLA (jit_compile=True): Horovod's allreduce has no XLA kernel. "
            "Compile the model with model.compile(..., jit_compile=False)."
        )
