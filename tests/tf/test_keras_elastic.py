"""hvd_largebatch.tf.elastic in one process: which errors become a reset, the fit inputs, accumulation, bad inputs.

The elastic behaviour under Horovod (failure, restore, rejoin) is tested in
tests/parallel/test_elastic.py; these checks need no launch.
"""

from __future__ import annotations

import horovod.tensorflow as hvd
import keras
import numpy as np
import pytest
import tensorflow as tf

from hvd_largebatch import schedules
from hvd_largebatch.elastic_data import epoch_order, local_batch_indices
from hvd_largebatch.schedules import ElasticSchedule
from hvd_largebatch.tf import LARS, DistributedOptimizer, elastic
from hvd_largebatch.tf.elastic_inputs import input_unit, rank_input

RECIPE = ElasticSchedule(base_lr=0.1, base_batch=8, total_examples=640)
SHUTDOWN = (
    "Horovod has been shut down. This was caused by an exception on one of the ranks or an attempt to "
    "allreduce, allgather or broadcast a tensor after one of the ranks finished execution."
)


def test_an_error_of_any_horovod_op_is_a_reset_and_others_are_not():
    grouped = tf.errors.UnknownError(None, None, f"{SHUTDOWN}\n\t [[{{{{node HorovodGroupedAllreduce_grads_0}}}}]]")
    assert elastic.is_horovod_error(grouped)
    assert elastic.is_horovod_error(tf.errors.UnknownError(None, None, f"{SHUTDOWN} [[node HorovodAllreduce_x]]"))
    assert not elastic.is_horovod_error(tf.errors.UnknownError(None, None, "some other failure"))
    assert not elastic.is_horovod_error(tf.errors.UnknownError(None, None, "mentions Horovod, no op of it"))
    assert not elastic.is_horovod_error(tf.errors.InvalidArgumentError(None, None, "Horovod op got bad shape"))
    assert not elastic.is_horovod_error(ValueError("Horovod"))


def test_run_passes_other_errors_through_instead_of_returning():
    def train(state):
        raise tf.errors.UnknownError(None, None, "a failure of no Horovod op")

    class NoState:
        def sync(self):
            pass

    with pytest.raises(tf.errors.UnknownError, match="no Horovod op"):
        # run_fn registers the state as a listener of the (not started) notification manager
        elastic.run(train)(NoState())


def compiled(passes: int = 1) -> keras.Model:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=DistributedOptimizer(LARS(learning_rate=0.1), backward_passes_per_step=passes),
                  loss="mse", jit_compile=False)
    return model


class Items(keras.utils.PyDataset):
    """Item ``i``: the ``unit`` examples from ``i * unit`` of every array."""

    def __init__(self, *arrays, unit=2):
        super().__init__()
        self.arrays, self.unit = arrays, unit

    def __len__(self):
        return len(self.arrays[0]) // self.unit

    def __getitem__(self, i):
        return tuple(array[i * self.unit:(i + 1) * self.unit] for array in self.arrays)


def examples(n=32):
    x = np.arange(3 * n, dtype="float32").reshape(n, 3)
    return x, np.arange(n)  # the target is the example's index


@pytest.mark.parametrize("kind", ["arrays", "tf.data", "tf.data in order", "PyDataset"])
def test_each_input_gives_this_ranks_examples_of_each_remaining_update(kind):
    # rank 1 of 2 workers, 4 per batch, 2 batches per update (global batch 16), 8 examples done
    x, y = examples()
    shuffle = kind != "tf.data in order"
    data = {
        "arrays": (x, y),
        "tf.data": (tf.data.Dataset.from_tensor_slices((x, y)).map(lambda a, b: (a, b)), None),
        "tf.data in order": (tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True), None),
        "PyDataset": (Items(x, y), None),
    }[kind]
    unit = input_unit(*data, dataset_size=32, shuffle=shuffle)
    assert unit == (2 if kind == "PyDataset" else 1)
    order = epoch_order(32, epoch=1, seed=5, shuffle=shuffle, unit=unit)
    expected = np.concatenate([local_batch_indices(order, 8 + 16 * u, 8, rank=1, world_size=2) for u in range(1)])
    got = rank_input(*data, expected, batch=4, unit=unit, per_update=8, examples_done=8, global_batch=16, rank=1)
    if kind == "arrays":
        assert got["batch_size"] == 4 and got["y"].tolist() == expected.tolist()
        return
    batches = [got["x"][i] for i in range(len(got["x"]))] if kind == "PyDataset" else list(got["x"])
    assert [len(b[1]) for b in batches] == [4, 4]
    assert np.concatenate([np.asarray(b[1]) for b in batches]).tolist() == expected.tolist()
    assert np.array_equal(np.concatenate([np.asarray(b[0]) for b in batches]), x[expected])


def test_inputs_that_cannot_be_read_by_example_are_refused():
    x, y = examples()
    cases = [
        (lambda: input_unit(tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True), None, 32, True),
         "shuffle=False"),
        (lambda: input_unit(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), None, 32, True), "unbatched"),
        (lambda: input_unit(Items(x[:30], y[:30]), None, 32, True), "PyDataset of 15"),
        (lambda: input_unit(Items(x, y), y, 32, True), "y must be None"),
        (lambda: input_unit(x, None, 32, True), "x and y must be arrays"),
        (lambda: rank_input(Items(x, y), None, np.arange(6), batch=3, unit=2, per_update=3, examples_done=0,
                            global_batch=3, rank=0), "per_worker_batch=3"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_accumulated_updates_resume_mid_epoch_and_never_commit_between_micro_batches():
    hvd.init()
    x, y = examples()
    model = compiled(passes=2)
    recipe = ElasticSchedule(base_lr=0.1, base_batch=8, total_examples=64)
    state = elastic.ElasticState(model, recipe, per_worker_batch=4, dataset_size=32, commit_every=1,
                                 examples_done=8)
    assert (state.global_batch, state.per_worker_batch) == (8, 4)  # 4 per batch x 2 passes x 1 worker
    committed = []
    state.commit = lambda: committed.append((state.updates, int(state.distributed.local_passes.numpy())))
    state.fit(Items(x, np.zeros((32, 2), "float32")), epochs=1, verbose=0)
    # from example 8 of 32: 3 updates of 8 examples (6 batches), a commit after each and at the epoch's end
    assert committed == [(1, 2), (2, 4), (3, 6), (3, 6)]
    assert int(state.optimizer.iterations.numpy()) == 3 and (state.epoch, state.examples_seen) == (1, 24)
    model.fit(x[:4], np.zeros((4, 2), "float32"), batch_size=4, verbose=0)  # one micro-batch of an update
    with pytest.raises(RuntimeError, match="between micro-batches"):
        elastic.ElasticState.save(state)


def test_bad_inputs_name_the_argument():
    hvd.init()
    step_schedule = schedules.make_schedule(0.1, 100, warmup="none")
    bare = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    cases = [
        (lambda: elastic.ElasticState(compiled(), RECIPE, per_worker_batch=4, dataset_size=64, commit_every=0),
         "commit_every"),
        (lambda: elastic.ElasticState(compiled(), RECIPE, per_worker_batch=4, dataset_size=64, commit_every=-2),
         "commit_every"),
        (lambda: elastic.ElasticState(bare, RECIPE, per_worker_batch=4, dataset_size=64), "optimizer is required"),
        (lambda: elastic.ElasticState(compiled(), step_schedule, per_worker_batch=4, dataset_size=64), "schedule"),
        (lambda: elastic.ElasticState(compiled(), RECIPE, dataset_size=64), "per_worker_batch"),
        (lambda: elastic.ElasticState(compiled(2), RECIPE, global_batch=5, dataset_size=64), "global_batch"),
        (lambda: elastic.ElasticCallback(object()), "state"),
    ]
    for call, argument in cases:
        with pytest.raises(ValueError, match=argument):
            call()
