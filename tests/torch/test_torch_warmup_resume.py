"""GradualWarmupScheduler follows the core Schedule in closed form; a checkpoint taken mid-warmup resumes exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hvd_largebatch import schedules
from hvd_largebatch.torch_impl import LAMB, LARS, SGD, GradualWarmupScheduler, load_checkpoint, save_checkpoint

SCHEDULE = schedules.goyal(0.1, 256, 2048, steps_per_epoch=4, epochs=10, warmup_epochs=3, milestones=(5, 8))


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 10, 3)
    )


def _batch(step):
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 1, 12, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def _train(model, opt, sched, steps, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def test_lr_is_the_schedule_at_every_step():
    opt = LARS(_model(0).parameters(), lr=123.0)
    sched = GradualWarmupScheduler(opt, SCHEDULE)
    seen = []
    with pytest.warns(UserWarning, match="ran past the schedule's total_steps=40") as caught:
        for _ in range(SCHEDULE.total_steps + 3):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    assert len(caught) == 1  # once, although three updates ran past the end
    assert seen == [SCHEDULE(t) for t in range(SCHEDULE.total_steps + 3)]
    assert seen[0] == 0.1 and seen[12] == pytest.approx(0.8) and seen[20] == pytest.approx(0.08)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert sched.get_last_lr() == [SCHEDULE(SCHEDULE.total_steps + 3)]


def test_scheduler_state_round_trip_and_deprecated_epoch_argument():
    opt = SGD(_model(0).parameters())
    sched = GradualWarmupScheduler(opt, SCHEDULE)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["schedule"] == SCHEDULE.to_config() and state["last_epoch"] == 5
    other_opt = SGD(_model(0).parameters())
    other = GradualWarmupScheduler(other_opt, schedules.Schedule(peak=9.0, total_steps=3))
    other.load_state_dict(state)
    assert other.schedule == SCHEDULE and other.last_epoch == 5
    with pytest.warns(UserWarning):
        other.step(9)  # torch's deprecated closed-form path
    assert other_opt.param_groups[0]["lr"] == SCHEDULE(9)


@pytest.mark.parametrize("make_opt", [
    lambda m: LARS(m.named_parameters(), lr=0.1, weight_decay=5e-4),
    lambda m: SGD(m.named_parameters(), lr=0.1, weight_decay=5e-4, nesterov=True),
    lambda m: LAMB(m.named_parameters(), lr=0.01),
], ids=["lars", "sgd-nesterov", "lamb"])
def test_resume_in_the_middle_of_warmup_continues_exactly(make_opt, tmp_path):
    total, cut = 20, 7  # warmup is 12 steps: the cut is inside it
    model = _model(0)
    opt = make_opt(model)
    sched = GradualWarmupScheduler(opt, SCHEDULE)
    _train(model, opt, sched, total)

    first = _model(0)
    first_opt = make_opt(first)
    first_sched = GradualWarmupScheduler(first_opt, SCHEDULE)
    _train(first, first_opt, first_sched, cut)
    path = tmp_path / "ckpt" / "state.pt"
    assert save_checkpoint(path, first, first_opt, first_sched, step=cut, extra={"epoch": 1})

    resumed = _model(42)  # different initial weights: everything must come from the file
    resumed_opt = make_opt(resumed)
    resumed_sched = GradualWarmupScheduler(resumed_opt, SCHEDULE)
    info = load_checkpoint(path, resumed, resumed_opt, resumed_sched)
    assert info == {"step": cut, "extra": {"epoch": 1}}
    assert resumed_opt.param_groups[0]["lr"] == SCHEDULE(cut)
    _train(resumed, resumed_opt, resumed_sched, total - cut, start=cut)

    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = resumed_opt.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    assert resumed_sched.last_epoch == sched.last_epoch == total
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_load_checkpoint_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    model = _model(0)
    with pytest.raises(ValueError, match="path"):
        load_checkpoint(path, model, LARS(model.parameters()))
