"""TensorFlow's single-pass kernels for a few steps of the update (the optimizers' ``fused=True`` path).

TensorFlow executes ``keras.ops`` elementwise operations one kernel at a
time, each a full pass over memory with a new output buffer; on ResNet-50's
shapes that makes LARS with ``keras.ops`` alone about 1.4x to 1.6x the time of
``keras.optimizers.SGD``. Kernels that TensorFlow already ships remove most of
the difference (``benchmarks/keras_optimizers.py``):

* ``tf.nn.l2_loss``: ``sum(x^2) / 2`` in one read (``keras.ops`` has
  ``sum(square(x))``, two passes and a temporary, or ``vdot``, a slow MatMul);
* ``ResourceApplyKerasMomentum``: ``m = c * m - rate * d; w = w + m`` in one
  in-place pass over ``w``, ``m`` and ``d``: exactly the momentum step of
  :func:`hvd_largebatch.tf.update_rules.momentum_buffer`;
* ``ResourceApplyGradientDescent``: ``w = w - alpha * u`` in one in-place
  pass (LAMB's last step), where ``keras.ops`` needs a product and a subtraction.

The ``keras.ops`` forms in :mod:`hvd_largebatch.tf.update_rules` are the
definition (``fused=False``); the tests check both against the float64 oracle.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["squared_norm", "apply_momentum", "apply_scaled_step"]


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
