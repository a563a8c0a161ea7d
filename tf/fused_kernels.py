"""Single-pass kernels for the optimizers' fused paths: TensorFlow's (``fused=True``) or our own (``fused="native"``).

TensorFlow executes ``keras.ops`` elementwise operations one kernel at a
time, each a full pass over memory with a new output buffer (a fresh
model-sized output also page-faults on CPU). The fused paths remove those
passes in one of two ways (measured by ``benchmarks/keras_optimizers.py``):

**Our CPU kernels**, ``fused="native"`` (``fused_kernels.cc`` beside this file, compiled with the
system C++ compiler on first use and cached, then loaded with
``tf.load_op_library``). Each op covers all tensors of a step and updates
variables in place, one pass over memory per op:

* :func:`tensor_stats`: ``sum(g)``, ``||g||^2`` and ``||w||^2`` of every
  tensor in one read of ``g`` and ``w`` (LARS's norms and the non-finite check),
  the first half of each tensor read in lockstep with its second half (one
  core reads memory faster from four streams than from two);
* :func:`apply_momentum_all`: ``d = g + beta*w; m = s*m - rate*d; w += m``
  (or Nesterov's ``w += mu*m - rate*d``): the rule of
  :func:`hvd_largebatch.tf.update_rules.momentum_buffer` with the decayed
  gradient formed on the fly (reads ``g, m, w``, writes ``m, w``);
* :func:`lamb_stats`: ``sum(g)``, ``||w||^2`` and ``||u/A||^2`` for the
  moments the step *would* write, writing nothing, so that a non-finite step
  can still be skipped; :func:`lamb_apply` then writes ``mu, nu`` and
  ``w -= a*u/A`` in one pass, with the same arithmetic, in the same order, as
  :func:`hvd_largebatch.tf.update_rules.lamb_moments` and ``lamb_direction``.

Their sums use a fixed blocking and fixed partial sums, and the file is
compiled without floating-point contraction, so results do not depend on the
thread count or on the vector instructions the compiler picks (every Horovod
rank computes the same bits). They serve float32/float64 variables of one
dtype in a CPU-only process, outside XLA (:func:`native_kernels_usable`).
They are off by default, because they need a C++ compiler the user may not
have and a first build of about 10 s. Where they are not asked for, do not
apply, or cannot be built (no compiler: a warning says so), the optimizers use:

**TensorFlow's kernels**, ``fused=True`` (the default): ``tf.nn.l2_loss`` (``||x||^2`` in one read, where
``keras.ops`` needs ``sum(square(x))``), ``ResourceApplyKerasMomentum``
(``m = s*m - rate*d; w += m`` in place; it sweeps ``m`` twice) and
``ResourceApplyGradientDescent`` (``w -= a*u`` in place).

The ``keras.ops`` forms in :mod:`hvd_largebatch.tf.update_rules` are the
definition (``fused=False``); the tests check all three paths against the
float64 oracle.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

__all__ = [
    "squared_norm",
    "apply_momentum",
    "apply_scaled_step",
    "NATIVE",
    "native_ops",
    "native_kernels_usable",
    "tensor_stats",
    "apply_momentum_all",
    "lamb_stats",
    "lamb_apply",
]

#: The optimizers' ``fused`` value that asks for our CPU kernels.
NATIVE = "native"
_SOURCE = Path(__file__).with_name("fused_kernels.cc")
_CXX_FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-w")


# --------------------------------------------------------------------------- TensorFlow's kernels
def squared_norm(x):
    """``||x||^2`` in one pass (``2 * tf.nn.l2_loss(x)``; the factor 2 is exact)."""
    return 2.0 * tf.nn.l2_loss(x)


def apply_momentum(variable, momentum_slot, d, rate, velocity_scale) -> None:
    """In place: ``m = velocity_scale * m - rate * d`` then ``w = w + m`` (no Nesterov), one kernel.

    Args:
        variable: the weight (a Keras variable).
        momentum_slot: its momentum slot ``m = -v`` (a Keras variable).
        d: the decayed gradient.
        rate: this tensor's rate (scalar, the variable's dtype).
        velocity_scale: ``momentum * c``, ``c`` the momentum-correction factor (scalar, the variable's dtype).
    """
    tf.raw_ops.ResourceApplyKerasMomentum(
        var=variable.handle,
        accum=momentum_slot.handle,
        lr=rate,
        grad=d,
        momentum=velocity_scale,
        use_locking=False,
        use_nesterov=False,
    )


def apply_scaled_step(variable, step_size, direction) -> None:
    """In place: ``w = w - step_size * direction``, one kernel."""
    tf.raw_ops.ResourceApplyGradientDescent(
        var=variable.handle, alpha=step_size, delta=direction, use_locking=False
    )


# --------------------------------------------------------------------------- our CPU kernels
def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hvd_largebatch"


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return any(line.startswith("flags") and " avx2" in line for line in info)
    except OSError:
        return False


def _build(compiler: str) -> Path:
    """Compiles ``fused_kernels.cc`` once per source, TensorFlow version and flags; returns the library path."""
    flags = list(_CXX_FLAGS) + (["-mavx2"] if _cpu_has_avx2() else [])
    tf_flags = tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags()
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), tf.__version__, compiler, *flags, *tf_flags]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"fused_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent Horovod ranks never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", str(partial), *tf_flags],
            check=True, capture_output=True, text=True,
        )
        os.replace(partial, target)
    return target


@functools.lru_cache(maxsize=None)
def _load() -> Any:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        warnings.warn(
            "hvd_largebatch: no C++ compiler (g++ or $CXX) found; the optimizers use TensorFlow's kernels, "
            "which take more passes over memory", RuntimeWarning, stacklevel=3,
        )
        return None
    try:
        return tf.load_op_library(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError, tf.errors.OpError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"hvd_largebatch: could not build or load {_SOURCE.name}; the optimizers use TensorFlow's "
            f"kernels. {detail.strip()[-2000:]}", RuntimeWarning, stacklevel=3,
        )
        return None


def native_ops() -> Any:
    """The loaded op module of ``fused_kernels.cc`` (built on first call), or None when it cannot be built."""
    return _load()


def native_kernels_usable(variables) -> bool:
    """Whether our CPU kernels can update ``variables`` in the graph being traced.

    True when they are built, every variable is float32, or every one float64,
    no GPU is visible (the kernels are CPU-only; variables on a GPU would be
    copied) and the trace is not inside XLA (the ops have no XLA kernels).
    """
    from tensorflow.python.ops import control_flow_util  # noqa: PLC0415 (TensorFlow-internal, read at trace time)

    dtypes = {keras.backend.standardize_dtype(v.dtype) for v in variables}
    if len(dtypes) != 1 or dtypes - {"float32", "float64"}:
        return False
    if tf.config.list_logical_devices("GPU"):
        return False
    if not tf.executing_eagerly() and control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return False
    return native_ops() is not None


def _handles(variables) -> list[Any]:
    return [v.handle for v in variables]


def tensor_stats(grads, weights=None):
    """Matrix ``[n, 3]``: per tensor ``sum(g)``, ``||g||^2`` and ``||w||^2`` (0 without ``weights``), one pass."""
    return native_ops().hvd_largebatch_tensor_stats(grads=list(grads), weights=_handles(weights or []))


def apply_momentum_all(variables, momentum_slots, grads, rates, weight_decays, velocity_scale, momentum,
                       nesterov: bool) -> None:
    """In place over all tensors: ``d = g + beta_l*w; m = s*m - r_l*d; w += m`` (Nesterov: ``w += mu*m - r_l*d``).

    Args:
        variables, momentum_slots, grads: lists of one dtype, slot ``m = -v``.
        rates: vector of the rates ``r_l``.
        weight_decays: vector of ``beta_l`` (0 where decay does not apply).
        velocity_scale: ``s = momentum * c`` (scalar).
        momentum: ``mu`` (scalar; used by Nesterov).
        nesterov: Nesterov's weight step.
    """
    native_ops().hvd_largebatch_apply_momentum(
        var=_handles(variables), accum=_handles(momentum_slots), grad=list(grads), rate=rates,
        weight_decay=weight_decays, velocity_scale=velocity_scale, momentum=momentum, nesterov=nesterov,
    )


def lamb_stats(grads, first_moments, second_moments, variables, beta_1, beta_2, scaled_eps, decay_over_scale):
    """Matrix ``[n, 3]``: per tensor ``sum(g)``, ``||w||^2`` and ``||q||^2``, writing nothing.

    ``q = mu'/(sqrt(nu') + e) + d_l*w`` is :func:`hvd_largebatch.tf.update_rules.lamb_direction`
    over the moments ``mu'``, ``nu'`` of :func:`~hvd_largebatch.tf.update_rules.lamb_moments`;
    ``decay_over_scale`` is the vector of ``d_l`` (0 where decay does not apply).
    """
    return native_ops().hvd_largebatch_lamb_stats(
        grads=list(grads), first=_handles(first_moments), second=_handles(second_moments),
        weights=_handles(variables), beta_1=beta_1, beta_2=beta_2, scaled_eps=scaled_eps,
        decay_over_scale=decay_over_scale,
    )


def lamb_apply(variables, first_moments, second_moments, grads, beta_1, beta_2, scaled_eps, decay_over_scale,
               step_sizes) -> None:
    """In place over all tensors: the new moments of :func:`lamb_stats`, then ``w -= a_l * q``."""
    native_ops().hvd_largebatch_lamb_apply(
        var=_handles(variables), first=_handles(first_moments), second=_handles(second_moments),
        grad=list(grads), beta_1=beta_1, beta_2=beta_2, scaled_eps=scaled_eps,
        decay_over_scale=decay_over_scale, step_size=step_sizes,
    )
