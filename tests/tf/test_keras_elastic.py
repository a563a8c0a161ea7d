"""hvd_largebatch.tf.elastic in one process: which errors become a reset, and the bad inputs.

The elastic behaviour under Horovod (failure, restore, rejoin) is tested in
tests/parallel/test_elastic.py; these checks need no launch.
"""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf

from hvd_largebatch import schedules
from hvd_largebatch.elastic_schedule import ElasticSchedule
from hvd_largebatch.tf import LARS, DistributedOptimizer, elastic

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


def test_bad_inputs_name_the_argument():
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
        (lambda: elastic.ElasticState(compiled(2), RECIPE, per_worker_batch=4, dataset_size=64),
         "backward_passes_per_step"),
        (lambda: elastic.ElasticCallback(object()), "state"),
    ]
    for call, argument in cases:
        with pytest.raises(ValueError, match=argument):
            call()
