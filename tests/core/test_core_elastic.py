"""The framework-free side of elastic training: the LR recipe in examples, and the position in the epoch.

* For a constant global batch the recipe is exactly the step schedule it
  came from (Goyal, LARS poly, cosine, constant warmup), update by update.
* After a change of global batch the LR at a point of training (examples
  seen) is the recipe's for the new batch: new peak, same warmup fraction,
  decay milestones at the same epoch, the same end (the issue's 2 -> 1
  worker case in numbers).
* The shards: over any sequence of world sizes inside an epoch, every
  example is trained on exactly once (up to the dropped remainder).
* Bad input: a clear ValueError naming the argument.
"""

from __future__ import annotations

import numpy as np
import pytest

from hvd_largebatch import schedules
from hvd_largebatch.elastic_data import (
    MISSING_OPTIMIZER_ERROR,
    ElasticPosition,
    check_commit_every,
    epoch_order,
    local_batch_indices,
    updates_left_in_epoch,
)
from hvd_largebatch.schedules import ElasticBatch, ElasticSchedule, check_elastic_schedule

B = 64  # the global batch the step schedules are built for
STEP_SCHEDULES = {
    "goyal": schedules.goyal(0.1, 32, B, steps_per_epoch=10, epochs=9, warmup_epochs=1, milestones=(3, 6, 8)),
    "lars_poly": schedules.lars_poly(0.1, 32, B, steps_per_epoch=10, epochs=9, warmup_epochs=2),
    "cosine_sqrt": schedules.make_schedule(
        0.1, 90, base_batch=32, global_batch=B, scaling="sqrt", warmup_steps=7, decay="cosine", end_lr=0.001
    ),
    "constant_warmup_linear": schedules.make_schedule(
        0.1, 90, base_batch=32, global_batch=B, warmup="constant", warmup_steps=5, warmup_start=0.05, decay="linear"
    ),
    "step_milestones_in_steps": schedules.make_schedule(
        0.1, 90, base_batch=32, global_batch=B, warmup="none", decay="step", milestones=(40, 70), milestone_unit="step"
    ),
}
SCALING = {"cosine_sqrt": "sqrt"}


@pytest.mark.parametrize("name", STEP_SCHEDULES)
def test_constant_global_batch_gives_exactly_the_step_schedule(name):
    step = STEP_SCHEDULES[name]
    recipe = ElasticSchedule.from_schedule(step, global_batch=B, base_lr=0.1, base_batch=32, scaling=SCALING.get(name, "linear"))
    assert [recipe.lr(t * B, B) for t in range(step.total_steps + 3)] == [step(t) for t in range(step.total_steps + 3)]
    as_steps = recipe.to_schedule(B)
    assert [as_steps(t) for t in range(step.total_steps + 1)] == [step(t) for t in range(step.total_steps + 1)]
    assert ElasticSchedule.from_config(recipe.to_config()) == recipe


def test_two_workers_to_one_the_issue_case():
    # 0.1 per 8 examples, linear scaling: peak 0.4 on two workers of 16 (global batch 32)
    recipe = ElasticSchedule.from_epochs(
        0.1, 8, examples_per_epoch=320, epochs=4, warmup_epochs=1, decay="step", milestones=(2, 3)
    )
    # two workers (global batch 32): warmup over 10 updates, peak 0.4, x0.1 at epochs 2 and 3
    two = [recipe.lr(t * 32, 32) for t in range(40)]
    assert two[0] == 0.1 and two[10] == pytest.approx(0.4) and two[20] == pytest.approx(0.04)
    # one worker left after 1.5 epochs (480 examples): the peak of global batch 16 is 0.2, the decays
    # arrive at epochs 2 and 3 (examples 640 and 960), and the run ends after the same 1280 examples
    one = [recipe.lr(480 + k * 16, 16) for k in range(50)]
    assert one[0] == pytest.approx(0.2)
    assert one[9] == pytest.approx(0.2) and one[10] == pytest.approx(0.02)  # 480 + 10*16 = 640 = epoch 2
    assert one[29] == pytest.approx(0.02) and one[30] == pytest.approx(0.002)  # 960 = epoch 3
    assert recipe.lr(1280, 16) == recipe.lr(10**6, 16) == pytest.approx(0.002)
    # mid-warmup (160 of its 320 examples) the warmup fraction is kept and the ramp ends at the new peak
    assert recipe.lr(160, 16) == pytest.approx(0.1 + (0.2 - 0.1) * 0.5)
    assert recipe.lr(160, 32) == pytest.approx(0.1 + (0.4 - 0.1) * 0.5)


def test_keeping_the_global_batch_keeps_the_lr():
    recipe = ElasticSchedule.from_epochs(0.1, 8, examples_per_epoch=320, epochs=4, warmup_epochs=1, decay="cosine")
    # 4 workers x 8 or 2 workers x 16: the same global batch, the same LR at every point
    assert schedules.per_worker_batch_size(32, 2) == 16
    assert [recipe.lr(e, 32) for e in range(0, 1281, 32)] == [recipe.lr(e, 4 * 8) for e in range(0, 1281, 32)]


@pytest.mark.parametrize("world_sizes", [(2, 2, 1, 1, 1, 2), (1, 2, 2), (3, 1, 2, 3)], ids=str)
@pytest.mark.parametrize("shuffle", [True, False])
def test_each_example_once_per_epoch_across_world_size_changes(world_sizes, shuffle):
    dataset_size, per_worker = 96, 4
    order = epoch_order(dataset_size, epoch=3, seed=7, shuffle=shuffle)
    assert sorted(order.tolist()) == list(range(dataset_size))
    seen, done, phase = [], 0, 0
    while True:
        size = world_sizes[min(phase, len(world_sizes) - 1)]
        if updates_left_in_epoch(dataset_size, done, per_worker * size) == 0:
            break
        for rank in range(size):
            seen.extend(local_batch_indices(order, done, per_worker, rank, size).tolist())
        done += per_worker * size
        phase += 1
    assert len(seen) == len(set(seen))
    assert dataset_size - len(seen) < per_worker * world_sizes[min(phase, len(world_sizes) - 1)]


class Position(ElasticPosition):
    """The shared bookkeeping with the batch of a world of ``size`` workers and a commit counter."""

    def __init__(self, policy: ElasticBatch, size: int, **kwargs):
        self.policy, self.commits = policy, []
        self.resize(size)
        self.init_position(**kwargs)

    def resize(self, size):
        self.size = size
        per_worker, self.global_batch = self.policy.for_world(size)
        self.per_update = per_worker * self.policy.backward_passes_per_step

    def world_batch(self):
        return self.per_update, self.global_batch

    def commit(self):
        self.commits.append(self.position())


@pytest.mark.parametrize("unit", [1, 2])
def test_position_covers_each_epoch_once_across_world_changes_with_accumulation(unit):
    # 2 examples per pass, 2 passes per update: 8 examples per update on 2 workers, 4 on 1
    position = Position(ElasticBatch(per_worker_batch=2, backward_passes_per_step=2), 2, dataset_size=52,
                        commit_every=2, seed=4, shuffle=True, extras={"epoch": 1, "log": []})
    seen = []
    for size in (2, 2, 1, 1, 1, 2):
        position.resize(size)
        parts = [position.update_indices(rank, size, unit)[0] for rank in range(size)]
        assert all(len(part) == 4 for part in parts)
        seen.extend(i for part in parts for i in part.tolist())
        position.update_done()
    left = [position.update_indices(rank, 2, unit) for rank in range(2)]
    seen.extend(i for parts in left for part in parts for i in part.tolist())
    assert sorted(seen) == list(range(52))  # 36 examples in 6 updates, then 2 updates of 8
    assert [c["updates"] for c in position.commits] == [2, 4, 6]
    assert position.commits[-1] == {"epoch": 1, "examples_done": 36, "updates": 6, "log": []}
    position.next_epoch()
    assert position.commits[-1]["epoch"] == 2 and position.commits[-1]["examples_done"] == 0
    position.set_position({"epoch": 1, "examples_done": 8, "updates": 1, "log": [1]})
    assert (position.epoch, position.examples_done, position.updates, position.log) == (1, 8, 1, [1])


def test_epoch_order_moves_whole_units():
    assert np.array_equal(epoch_order(12, 1, seed=3), np.random.default_rng(4).permutation(12))
    blocks = epoch_order(12, 1, seed=3, unit=3).reshape(4, 3)
    assert (blocks % 3 == [0, 1, 2]).all() and sorted(blocks[:, 0] // 3) == [0, 1, 2, 3]


def test_batch_policy_follows_or_keeps_the_global_batch():
    assert ElasticBatch(per_worker_batch=16).for_world(3) == (16, 48)
    assert ElasticBatch(global_batch=96, backward_passes_per_step=2).for_world(3) == (16, 96)


def test_every_worker_sees_the_same_order():
    assert np.array_equal(epoch_order(50, 2, seed=1), epoch_order(50, 2, seed=1))
    assert not np.array_equal(epoch_order(50, 2, seed=1), epoch_order(50, 3, seed=1))


BAD_INPUTS = [
    ("no batch reference", lambda: ElasticSchedule.from_schedule(
        STEP_SCHEDULES["step_milestones_in_steps"], global_batch=None, base_lr=0.1, base_batch=32), "global_batch"),
    ("peak not from the rule", lambda: ElasticSchedule.from_schedule(
        STEP_SCHEDULES["goyal"], global_batch=2 * B, base_lr=0.1, base_batch=32), "peak"),
    ("not a schedule", lambda: ElasticSchedule.from_schedule(
        lambda t: 0.1, global_batch=B, base_lr=0.1, base_batch=32), "schedule"),
    ("zero total", lambda: ElasticSchedule(0.1, 32, 0), "total_examples"),
    ("warmup longer than run", lambda: ElasticSchedule(0.1, 32, 100, warmup_examples=101), "warmup_examples"),
    ("float warmup examples", lambda: ElasticSchedule(0.1, 32, 100, warmup_examples=1.5), "warmup_examples"),
    ("unknown scaling", lambda: ElasticSchedule(0.1, 32, 100, scaling="cubic"), "scaling"),
    ("step decay without milestones", lambda: ElasticSchedule(0.1, 32, 100, decay="step"), "milestones"),
    ("milestone in warmup", lambda: ElasticSchedule(0.1, 32, 100, warmup_examples=50, decay="step",
                                                    milestones=(40,)), "milestones"),
    ("negative examples seen", lambda: ElasticSchedule(0.1, 32, 100).lr(-1, 32), "examples_seen"),
    ("zero global batch", lambda: ElasticSchedule(0.1, 32, 100).lr(0, 0), "global_batch"),
    ("end above the peak", lambda: ElasticSchedule(0.1, 32, 100, decay="poly", end_lr=0.5).lr(99, 32), "end_lr"),
    ("to_schedule not dividing", lambda: ElasticSchedule(0.1, 32, 100).to_schedule(32), "global_batch"),
    ("epochs negative", lambda: ElasticSchedule.from_epochs(0.1, 32, 100, epochs=-1), "epochs"),
    ("unknown config key", lambda: ElasticSchedule.from_config({"base_lr": 0.1, "peak": 1}), "peak"),
    ("commit interval 0", lambda: check_commit_every(0), "commit_every"),
    ("commit interval -3", lambda: check_commit_every(-3), "commit_every"),
    ("commit interval 2.5", lambda: check_commit_every(2.5), "commit_every"),
    ("commit interval True", lambda: check_commit_every(True), "commit_every"),
    ("past the epoch's end", lambda: local_batch_indices(np.arange(8), 6, 2, 0, 2), "examples_done"),
    ("rank outside world", lambda: local_batch_indices(np.arange(8), 0, 2, 2, 2), "rank"),
    ("examples done beyond data", lambda: updates_left_in_epoch(8, 9, 2), "examples_done"),
    ("unit not dividing the data", lambda: epoch_order(10, 0, unit=3), "unit"),
    ("both batches", lambda: ElasticBatch(per_worker_batch=4, global_batch=8), "exactly one of"),
    ("no batch", lambda: ElasticBatch(), "exactly one of"),
    ("zero passes", lambda: ElasticBatch(per_worker_batch=4, backward_passes_per_step=0), "backward_passes_per_step"),
    ("global batch not shared equally", lambda: ElasticBatch(global_batch=8).for_world(3), "global_batch"),
    ("a step schedule where a recipe is needed", lambda: check_elastic_schedule(STEP_SCHEDULES["goyal"]),
     "from_schedule"),
    ("position commit interval 0", lambda: Position(ElasticBatch(per_worker_batch=2), 1, dataset_size=8,
                                                     commit_every=0, seed=0, shuffle=True, extras={}), "commit_every"),
]


@pytest.mark.parametrize("call,argument", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_missing_optimizer_message_names_the_argument():
    assert MISSING_OPTIMIZER_ERROR.startswith("optimizer is required")
