"""Per-example gradient norms for CLARS, in TensorFlow: the ``exact`` and ``microbatch:k`` estimators.

CLARS (ALGORITHMS.md) needs, for every parameter tensor ``l``, the mean over
the global batch of the per-example gradient norms,
``s_l = (1/B) sum_i ||grad_l f_i(w)||``. Each worker computes the *sum* of
the norms over its local examples and their count; one small allreduce
(``n_tensors + 1`` numbers) then gives the global mean.

* ``exact``: the norms of the true per-example gradients. With a model at
  hand (:func:`exact_norm_sums_by_rules`, used by :class:`~hvd_largebatch.tf.CLARSModel`)
  the variables of ``Dense``, ``Conv1D``, ``Conv2D`` and BatchNorm layers are
  measured from activations and output gradients without forming
  per-example gradients (:mod:`hvd_largebatch.tf.ghost_norms`: one forward
  and one backward pass over the batch); every other variable, and every
  variable in :func:`exact_norm_sums`, by the reference path:
  ``tf.vectorized_map`` of a one-example gradient over chunks of
  ``chunk_size`` examples (a ``tf.while_loop`` over the chunks), so that at
  most ``chunk_size`` per-example gradients exist at once. Both give the
  same numbers to rounding (tested in float64);
* ``microbatch:k``: the batch split into ``k`` contiguous micro-batches
  (sizes as ``numpy.array_split``); each contributes the norm of its
  mean-loss gradient, and ``s`` is the mean of these ``k`` norms. With
  ``k`` equal to the batch size it is ``exact``.

The functions take a ``loss_of_batch(x, y) -> scalar mean loss`` so that
they know nothing of Keras; :class:`hvd_largebatch.tf.CLARSModel` supplies one
that runs the model in inference mode (see there for BatchNorm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from hvd_largebatch import config
from hvd_largebatch.tf.ghost_norms import GhostRecorder

__all__ = ["per_example_grad_norm_sums", "exact_norm_sums_by_rules", "norm_dtype"]

LossOfBatch = Callable[[Any, Any], Any]
LossOfOutputs = Callable[[Any, Any], Any]


def norm_dtype(variables: Sequence[Any]) -> tf.DType:
    """float64 when any variable is float64, else float32: the dtype of the norm vectors."""
    return tf.float64 if any(tf.as_dtype(v.dtype) == tf.float64 for v in variables) else tf.float32


def _gradient_norm_list(loss_of_batch: LossOfBatch, variables: Sequence[Any], x: Any, y: Any, dtype: tf.DType):
    """``[||grad_l loss(x, y)||]`` over the variables (0 where a variable gets no gradient).

    A list, not a stacked vector: under ``tf.vectorized_map`` with a dynamic
    chunk of one example, pfor returns these scalars without their batch
    axis, and a ``tf.stack`` of them inside the vectorised function fails.
    """
    with tf.GradientTape() as tape:
        loss = loss_of_batch(x, y)
    grads = tape.gradient(loss, list(variables))
    return [
        tf.zeros((), dtype=dtype) if g is None else tf.cast(tf.norm(tf.convert_to_tensor(g)), dtype) for g in grads
    ]


def _batch_size(x: Any) -> tf.Tensor:
    return tf.shape(tf.nest.flatten(x)[0], out_type=tf.int32)[0]


def _rows(structure: Any, start, stop) -> Any:
    return tf.nest.map_structure(lambda t: t[start:stop], structure)


def _loop_total(more: Callable, body: Callable, length: int, dtype) -> tf.Tensor:
    """``tf.while_loop`` over ``(i, total)`` from ``(0, zeros(length))`` while ``more(i)``; returns ``total``."""
    _, total = tf.while_loop(
        lambda i, total: more(i), body, (tf.constant(0, tf.int32), tf.zeros((length,), dtype=dtype))
    )
    return total


def exact_norm_sums(loss_of_batch: LossOfBatch, variables: Sequence[Any], x: Any, y: Any, chunk_size: int):
    """``(sum_i ||grad_l f_i||  per tensor, B)`` from true per-example gradients, ``chunk_size`` at a time."""
    dtype = norm_dtype(variables)
    batch = _batch_size(x)

    def one_example(example):
        xi, yi = example
        add_batch_axis = lambda t: tf.expand_dims(t, 0)  # noqa: E731 - the model expects a batch axis
        return _gradient_norm_list(
            loss_of_batch, variables, tf.nest.map_structure(add_batch_axis, xi), add_batch_axis(yi), dtype
        )

    def body(start, total):
        stop = tf.minimum(start + chunk_size, batch)
        norms = tf.vectorized_map(one_example, (_rows(x, start, stop), _rows(y, start, stop)))
        # reshape: with a dynamic chunk of one example, pfor can return the norms without their batch axis.
        return stop, total + tf.stack([tf.reduce_sum(tf.reshape(n, (-1,))) for n in norms])

    return _loop_total(lambda start: start < batch, body, len(variables), dtype), tf.cast(batch, dtype)


def exact_norm_sums_by_rules(
    model: Any, loss_of_outputs: LossOfOutputs, variables: Sequence[Any], x: Any, y: Any, chunk_size: int
):
    """As :func:`exact_norm_sums`, with ghost-norm rules for the layers that have one.

    Args:
        model: the Keras model, run as ``model(x, training=False)``.
        loss_of_outputs: ``(y_true, y_pred) -> scalar``, the mean loss over
            the examples given; the per-example loss is its value on one example.
        variables, x, y, chunk_size: as :func:`exact_norm_sums` (``x`` a tensor).

    Returns:
        ``(sums, B)`` as :func:`exact_norm_sums`.
    """
    dtype = norm_dtype(variables)
    recorder = GhostRecorder(model, variables)
    with tf.GradientTape() as tape:
        with recorder:
            y_pred = model(x, training=False)
        one = lambda example: loss_of_outputs(example[0][None], example[1][None])  # noqa: E731
        objective = tf.reduce_sum(tf.vectorized_map(one, (y, y_pred)))
    squared = recorder.squared_norms(recorder.output_gradients(tape, objective))
    rest = recorder.unsupported()
    rest_sums = {}
    if rest:
        loss_of_batch = lambda xb, yb: loss_of_outputs(yb, model(xb, training=False))  # noqa: E731
        totals, _ = exact_norm_sums(loss_of_batch, rest, x, y, chunk_size)
        rest_sums = {id(v): totals[index] for index, v in enumerate(rest)}
    sums = [
        rest_sums[id(v)] if id(v) in rest_sums else tf.reduce_sum(tf.sqrt(tf.maximum(tf.cast(squared[id(v)], dtype), 0)))
        for v in variables
    ]
    return tf.stack(sums), tf.cast(_batch_size(x), dtype)


def microbatch_norm_sums(loss_of_batch: LossOfBatch, variables: Sequence[Any], x: Any, y: Any, microbatches: int):
    """``(sum over micro-batches of ||grad_l mean loss||, number of micro-batches)``.

    The batch is cut into ``min(k, B)`` contiguous parts whose sizes differ
    by at most one, the larger ones first (as ``numpy.array_split``).
    """
    dtype = norm_dtype(variables)
    batch = _batch_size(x)
    parts = tf.minimum(tf.constant(microbatches, tf.int32), batch)
    base, extra = batch // parts, batch % parts

    def body(j, total):
        start = j * base + tf.minimum(j, extra)
        stop = start + base + tf.cast(j < extra, tf.int32)
        norms = _gradient_norm_list(loss_of_batch, variables, _rows(x, start, stop), _rows(y, start, stop), dtype)
        return j + 1, total + tf.stack(norms)

    return _loop_total(lambda j: j < parts, body, len(variables), dtype), tf.cast(parts, dtype)


def per_example_grad_norm_sums(
    loss_of_batch: LossOfBatch,
    variables: Sequence[Any],
    x: Any,
    y: Any,
    *,
    estimator: str = "exact",
    chunk_size: int = 32,
):
    """The local sums of per-example (or per-micro-batch) gradient norms, and their count.

    Args:
        loss_of_batch: ``(x, y) -> scalar``, the mean loss over the examples given.
        variables: the tensors ``l`` (the optimizer's variables, in its order).
        x, y: this worker's batch (``x`` may be a nested structure of tensors).
        estimator: ``"exact"`` or ``"microbatch:k"``.
        chunk_size: ``exact`` only, examples per vectorised chunk.

    Returns:
        ``(sums, count)``: a vector with one entry per variable and a scalar;
        ``sums / count`` is the local ``s``. Sum both over workers before
        dividing to get the global mean.

    Raises:
        ValueError: naming ``estimator`` or ``chunk_size``.
    """
    kind, microbatches = config.parse_estimator(estimator)
    if kind == "exact":
        chunk_size = config.check_positive_int("chunk_size", chunk_size)
        return exact_norm_sums(loss_of_batch, variables, x, y, chunk_size)
    return microbatch_norm_sums(loss_of_batch, variables, x, y, microbatches)
