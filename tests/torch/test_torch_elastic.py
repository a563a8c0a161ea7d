"""hvd_largebatch.torch_impl.elastic in one process: the LR scheduler's math and state, and the bad inputs.

The elastic behaviour under Horovod (failure, restore, rejoin) is tested in
tests/parallel/test_elastic.py; these checks need no launch.
"""

from __future__ import annotations

import pytest
import torch

from hvd_largebatch import schedules
from hvd_largebatch.schedules import ElasticSchedule
from hvd_largebatch.torch_impl import LARS, GradualWarmupScheduler
from hvd_largebatch.torch_impl.elastic import ElasticLRScheduler, ElasticState

RECIPE = ElasticSchedule.from_epochs(0.1, 8, examples_per_epoch=64, epochs=3, warmup_epochs=1, decay="step",
                                     milestones=(2,))


def parts():
    model = torch.nn.Linear(3, 2)
    optimizer = LARS(model.named_parameters(), lr=0.1, weight_decay=1e-3)
    return model, optimizer


def test_scheduler_sets_the_recipe_lr_of_each_update_and_follows_the_world_size():
    model, optimizer = parts()
    sched = ElasticLRScheduler(optimizer, RECIPE, per_worker_batch=4, world_size=2)
    seen = []
    for _ in range(5):
        seen.append((sched.examples_seen, optimizer.param_groups[0]["lr"]))
        sched.step()
    assert seen == [(8 * t, RECIPE.lr(8 * t, 8)) for t in range(5)]
    sched.set_world_size(1)  # one worker left: global batch 4, the LR of the same point for it
    assert (sched.global_batch, sched.per_worker_batch) == (4, 4)
    assert optimizer.param_groups[0]["lr"] == RECIPE.lr(40, 4)
    saved = sched.state_dict()
    sched.step()
    sched.load_state_dict(saved)
    assert (sched.examples_seen, optimizer.param_groups[0]["lr"]) == (40, RECIPE.lr(40, 4))


def test_keeping_the_global_batch_changes_the_per_worker_batch_only():
    _, optimizer = parts()
    sched = ElasticLRScheduler(optimizer, RECIPE, global_batch=16, world_size=4)
    assert sched.per_worker_batch == 4
    sched.set_world_size(2)
    assert (sched.global_batch, sched.per_worker_batch) == (16, 8)
    assert optimizer.param_groups[0]["lr"] == RECIPE.lr(0, 16)
    with pytest.raises(ValueError, match="global_batch"):
        sched.set_world_size(3)


def test_bad_inputs_name_the_argument():
    model, optimizer = parts()
    sched = ElasticLRScheduler(optimizer, RECIPE, per_worker_batch=4, world_size=1)
    step_schedule = schedules.make_schedule(0.1, 100, warmup="none", decay="step", milestones=(50,),
                                            milestone_unit="step")
    cases = [
        (lambda: ElasticState(model, optimizer, sched, dataset_size=64, commit_every=0), "commit_every"),
        (lambda: ElasticState(model, optimizer, sched, dataset_size=64, commit_every=-1), "commit_every"),
        (lambda: ElasticState(model, None, sched, dataset_size=64), "optimizer is required"),
        (lambda: ElasticState(model, optimizer, GradualWarmupScheduler(optimizer, step_schedule), dataset_size=64),
         "scheduler"),
        (lambda: ElasticLRScheduler(optimizer, step_schedule, per_worker_batch=4, world_size=1), "schedule"),
        (lambda: ElasticLRScheduler(optimizer, RECIPE, world_size=1), "per_worker_batch"),
        (lambda: ElasticLRScheduler(optimizer, RECIPE, per_worker_batch=0, world_size=1), "per_worker_batch"),
        (lambda: ElasticLRScheduler(optimizer, RECIPE, per_worker_batch=4, world_size=0), "world_size"),
        (lambda: ElasticLRScheduler(optimizer, RECIPE, per_worker_batch=4, world_size=1, examples_seen=-4),
         "examples_seen"),
        (lambda: ElasticSchedule.from_schedule(step_schedule, global_batch=None, base_lr=0.1, base_batch=8),
         "global_batch"),
    ]
    for call, argument in cases:
        with pytest.raises(ValueError, match=argument):
            call()
