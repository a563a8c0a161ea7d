"""This rank's examples of the rest of an epoch as a ``model.fit`` input: arrays, ``tf.data.Dataset`` or ``PyDataset``.

:class:`~hvd_largebatch.tf.elastic.ElasticState` knows, from the committed
position, the example indices this rank trains on until the end of the
epoch (:mod:`hvd_largebatch.elastic_data`: its slice of every remaining
global batch, in order). :func:`rank_input` turns them into what
``model.fit`` reads, ``per_worker_batch`` examples per batch:

* arrays (NumPy or anything indexable by an index array): ``x[indices]``,
  ``y[indices]``;
* a ``tf.data.Dataset`` of single examples (not batched) that supports
  random access (``from_tensor_slices``, ``range``, ``map`` of those; see
  ``tf.data.experimental.at``): the examples at ``indices``, read by index,
  so the state's seeded shuffle applies; one that is read only in order
  (files, ``filter``, ...) needs ``shuffle=False`` in the state: the epoch is
  then the stream's order, and this rank takes its slice of each global
  batch after skipping the examples already done;
* a ``keras.utils.PyDataset`` whose item ``i`` is a batch of ``unit``
  examples, ``i * unit`` to ``(i + 1) * unit - 1`` (``unit =
  dataset_size / len(dataset)``): the state permutes whole items, and each
  batch here concatenates the items of its examples.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = ["input_unit", "rank_input", "RankBatches"]


def input_unit(x: Any, y: Any, dataset_size: int, shuffle: bool) -> int:
    """The examples that move together in the epoch's order: ``len``-derived for a PyDataset, else 1.

    Raises:
        ValueError: naming ``y`` when it is given with a dataset; naming
            ``x`` when its size does not match ``dataset_size``, or when it
            is a ``tf.data.Dataset`` without random access and ``shuffle`` is on.
    """
    if isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)):
        if y is not None:
            raise ValueError(f"y must be None when x is a {type(x).__name__} (it yields the targets), got {type(y).__name__}")
    if isinstance(x, keras.utils.PyDataset):
        items = len(x)
        if items < 1 or dataset_size % items:
            raise ValueError(
                f"x: a PyDataset of {items} batches cannot hold dataset_size={dataset_size} examples in equal "
                "batches; allowed: a PyDataset whose every item is a batch of dataset_size / len(x) examples"
            )
        return dataset_size // items
    if isinstance(x, tf.data.Dataset):
        cardinality = int(x.cardinality())
        if cardinality >= 0 and cardinality != dataset_size:
            raise ValueError(
                f"x: the tf.data.Dataset holds {cardinality} elements, not dataset_size={dataset_size} single examples "
                "(pass it unbatched)"
            )
        if shuffle and not supports_random_access(x):
            raise ValueError(
                "x: this tf.data.Dataset can only be read in order (no random access), so the state cannot apply its "
                "shuffle=True; build the ElasticState with shuffle=False (the dataset's own order, which must be the "
                "same on every rank and every pass) or pass a dataset with random access"
            )
        return 1
    if y is None or len(x) != dataset_size or len(y) != dataset_size:
        raise ValueError(
            f"x and y must be arrays of dataset_size={dataset_size} examples (or x a tf.data.Dataset or "
            f"keras.utils.PyDataset), got x of {type(x).__name__} and y of {type(y).__name__}"
        )
    return 1


def supports_random_access(dataset: tf.data.Dataset) -> bool:
    """True when ``tf.data.experimental.at(dataset, 0)`` works (the pipeline can be read by index)."""
    try:
        tf.data.experimental.at(dataset, 0)
    except tf.errors.UnimplementedError:
        return False
    return True


class RankBatches(keras.utils.PyDataset):
    """Batches of ``batch`` examples of ``source`` (a PyDataset of ``unit``-example items) at ``indices``, in order.

    ``indices`` are whole items: runs of ``unit`` indices ``i * unit, ...,
    i * unit + unit - 1``; batch ``j`` concatenates the items of
    ``indices[j * batch : (j + 1) * batch]``.
    """

    def __init__(self, source: keras.utils.PyDataset, indices: np.ndarray, batch: int, unit: int):
        super().__init__()
        self.source = source
        self.items = np.asarray(indices)[::unit] // unit
        self.items_per_batch = batch // unit

    def __len__(self) -> int:
        return len(self.items) // self.items_per_batch

    def __getitem__(self, index: int) -> Any:
        chosen = self.items[index * self.items_per_batch:(index + 1) * self.items_per_batch]
        parts = [self.source[int(item)] for item in chosen]
        return keras.tree.map_structure(lambda *arrays: np.concatenate(arrays, axis=0), *parts)


def rank_input(
    x: Any,
    y: Any,
    indices: np.ndarray,
    *,
    batch: int,
    unit: int,
    per_update: int,
    examples_done: int,
    global_batch: int,
    rank: int,
) -> dict[str, Any]:
    """``model.fit`` keyword arguments (``x``, and ``y``, ``batch_size`` for arrays) for this rank's ``indices``.

    Args:
        x, y: the data (see the module docstring); ``y`` None for datasets.
        indices: this rank's example indices, every remaining update's in order.
        batch: examples per ``fit`` batch (the per-worker batch).
        unit: :func:`input_unit`'s value.
        per_update: this rank's examples per update (``batch`` times the
            backward passes per update).
        examples_done, global_batch, rank: the position and the world, for a
            ``tf.data.Dataset`` read in order.

    Raises:
        ValueError: naming ``per_worker_batch`` when a PyDataset's items do not divide it.
    """
    if isinstance(x, keras.utils.PyDataset):
        if batch % unit:
            raise ValueError(
                f"per_worker_batch={batch} is not a multiple of the PyDataset's {unit} examples per item; "
                "allowed: whole items per batch"
            )
        return {"x": RankBatches(x, indices, batch, unit)}
    if not isinstance(x, tf.data.Dataset):
        return {"x": x[indices], "y": y[indices], "batch_size": batch}
    if supports_random_access(x):
        def example(index):
            return tf.data.experimental.at(x, index)

        return {"x": tf.data.Dataset.from_tensor_slices(indices).map(example).batch(batch)}
    # Read in order: skip what is done, cut the rest into global batches, keep this rank's slice of each.
    start = rank * per_update
    updates = len(indices) // per_update

    def rank_slice(*parts):
        element = parts if len(parts) > 1 else parts[0]
        return tf.nest.map_structure(lambda t: t[start:start + per_update], element)

    stream = x.skip(examples_done).take(updates * global_batch).batch(global_batch, drop_remainder=True)
    return {"x": stream.map(rank_slice).unbatch().batch(batch)}
