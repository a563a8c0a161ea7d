"""Schedule values against hand-computed numbers, every warmup and decay kind, edge cases, round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from hvd_largebatch import schedules
from hvd_largebatch.schedules import Schedule, make_schedule

# Goyal et al.'s ImageNet recipe at 8K: 1,281,167 images // 8192 = 156 steps per epoch.
SPE = 156
W = 5 * SPE  # 780
T = 90 * SPE  # 14040


@pytest.fixture(scope="module")
def goyal_8k() -> Schedule:
    return schedules.goyal(0.1, 256, 8192, steps_per_epoch=schedules.steps_per_epoch(1281167, 8192), epochs=90)


def test_goyal_8k_hand_computed(goyal_8k):
    assert (goyal_8k.total_steps, goyal_8k.warmup_steps, goyal_8k.steps_per_epoch) == (T, W, SPE)
    expected = {
        0: 0.1,
        1: 0.1 + 3.1 / 780,  # per-iteration ramp from base_lr to peak
        390: 0.1 + 3.1 / 2,
        779: 3.2 - 3.1 / 780,
        780: 3.2,  # end of warmup
        30 * SPE - 1: 3.2,
        30 * SPE: 0.32,  # after epoch 30
        60 * SPE - 1: 0.32,
        60 * SPE: 0.032,  # after epoch 60
        80 * SPE - 1: 0.032,
        80 * SPE: 0.0032,  # after epoch 80
        T - 1: 0.0032,
        T: 0.0032,
        T + 1: 0.0032,  # past the end: value at T
        10 * T: 0.0032,
    }
    for step, lr in expected.items():
        assert goyal_8k(step) == pytest.approx(lr, rel=1e-12, abs=0), step
    assert goyal_8k.milestone_steps == (4680, 9360, 12480)


@pytest.mark.parametrize(
    "epochs, warmup_steps, milestones, total_steps",
    [
        (90, 5 * 10, (30, 60, 80), 900),  # the paper's recipe
        (180, 5 * 10, (60, 120, 160), 1800),  # longer runs keep Goyal's 5 warmup epochs
        (9, 5, (3, 6, 8), 90),  # shorter runs: the same fractions, warmup 1/18 of the run
        (3, 2, (1, 2, 8 / 3), 30),  # 1/6 epoch of warmup rounds to 2 steps
        (50, 28, (50 / 3, 100 / 3, 400 / 9), 500),
    ],
)
def test_goyal_defaults_follow_epochs(epochs, warmup_steps, milestones, total_steps):
    s = schedules.goyal(0.1, 256, 1024, steps_per_epoch=10, epochs=epochs)
    assert (s.warmup_steps, s.total_steps) == (warmup_steps, total_steps)
    assert s.milestones == pytest.approx(milestones, rel=1e-15)
    assert s(s.total_steps) == pytest.approx(0.4 * 0.1**3)  # every default milestone lies within training


def test_goyal_needs_epochs():
    with pytest.raises(TypeError, match="epochs"):
        schedules.goyal(0.1, 256, 1024, 10)


def test_goyal_warmup_is_linear_in_the_step(goyal_8k):
    values = [goyal_8k(t) for t in range(W + 1)]
    increments = {round(b - a, 12) for a, b in zip(values, values[1:])}
    assert increments == {round(3.1 / 780, 12)}


def test_scale_lr_rules():
    assert schedules.scale_lr(0.1, 256, 8192) == pytest.approx(3.2, rel=1e-15)
    assert schedules.scale_lr(0.1, 256, 128, "linear") == pytest.approx(0.05, rel=1e-15)
    assert schedules.scale_lr(0.1, 256, 8192, "sqrt") == pytest.approx(0.1 * math.sqrt(32), rel=1e-15)
    assert schedules.scale_lr(0.1, 256, 8192, "none") == 0.1


def test_batch_helpers():
    assert schedules.global_batch_size(256, 32) == 8192
    assert schedules.global_batch_size(64, 2, backward_passes_per_step=4) == 512
    assert schedules.per_worker_batch_size(8192, 32) == 256
    assert schedules.per_worker_batch_size(512, 2, backward_passes_per_step=4) == 64
    assert schedules.steps_per_epoch(1000, 256) == 3
    assert schedules.steps_per_epoch(1000, 256, drop_remainder=False) == 4
    assert schedules.steps_per_epoch(1024, 256, drop_remainder=False) == 4
    assert schedules.epochs_to_steps(5, 156) == 780
    assert schedules.epochs_to_steps(0.5, 155) == 78  # 77.5 rounds half up
    assert schedules.epochs_to_steps(0, 155) == 0


def test_momentum_correction_factor():
    assert schedules.momentum_correction(3.2, 0.32) == pytest.approx(0.1, rel=1e-15)
    assert schedules.momentum_correction(0.1, 0.2) == 2.0
    assert schedules.momentum_correction(0.0, 0.5) == 1.0
    assert schedules.momentum_correction(0.5, 0.0) == 0.0


# --------------------------------------------------------------------------
# Every warmup kind and every decay kind on a small schedule: peak 1, W = 4, T = 12.
# --------------------------------------------------------------------------
def small(**kw) -> Schedule:
    base = dict(peak=1.0, total_steps=12, warmup="gradual", warmup_steps=4, warmup_start=0.2)
    base.update(kw)
    return Schedule(**base)


def test_warmup_kinds():
    gradual = small()
    assert [gradual(t) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0], rel=1e-14)
    constant = small(warmup="constant")
    assert [constant(t) for t in range(5)] == [0.2, 0.2, 0.2, 0.2, 1.0]
    none = Schedule(peak=1.0, total_steps=12)
    assert [none(t) for t in range(5)] == [1.0] * 5


def test_warmup_start_forms():
    kw = dict(base_batch=256, global_batch=2048, warmup_steps=10, total_steps=100)
    assert make_schedule(0.1, **kw)(0) == 0.1  # default: base_lr (Goyal)
    assert make_schedule(0.1, warmup_start="base_lr", **kw)(0) == 0.1
    horovod = make_schedule(0.1, warmup_start="peak/world_size", world_size=16, **kw)
    assert horovod(0) == pytest.approx(0.8 / 16, rel=1e-15)
    assert horovod(5) == pytest.approx(0.05 + (0.8 - 0.05) * 5 / 10, rel=1e-14)
    assert make_schedule(0.1, warmup_start=0.0, **kw)(5) == pytest.approx(0.4, rel=1e-14)


def test_step_decay_in_steps_and_epochs():
    in_steps = small(decay="step", milestones=(6, 9), milestone_unit="step", gamma=0.5)
    assert [in_steps(t) for t in range(4, 13)] == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]
    # epochs of 3 steps: milestone at epoch 2 = step 6, at epoch 3.5 -> t/S >= 3.5 first at step 11
    in_epochs = small(decay="step", milestones=(2, 3.5), steps_per_epoch=3, gamma=0.5)
    assert [in_epochs(t) for t in range(4, 13)] == [1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert in_epochs.milestone_steps == (6, 11)


def test_poly_cosine_linear_constant():
    # u = t - 4, D = 8
    poly = small(decay="poly", power=2.0, end_lr=0.1)
    for t in range(4, 13):
        assert poly(t) == pytest.approx(0.1 + 0.9 * (1 - (t - 4) / 8) ** 2, rel=1e-14)
    assert poly(8) == pytest.approx(0.1 + 0.9 * 0.25, rel=1e-14)
    cubic = small(decay="poly", power=3.0)
    assert cubic(8) == pytest.approx(0.125, rel=1e-14)
    cosine = small(decay="cosine", end_lr=0.2)
    assert cosine(4) == pytest.approx(1.0, rel=1e-14)
    assert cosine(8) == pytest.approx(0.6, rel=1e-14)  # halfway: mean of peak and end
    assert cosine(6) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-14)
    assert cosine(12) == pytest.approx(0.2, rel=1e-14)
    linear = small(decay="linear", end_lr=0.2, power=7.0)  # power is ignored by "linear"
    assert [linear(t) for t in (4, 6, 8, 12)] == pytest.approx([1.0, 0.8, 0.6, 0.2], rel=1e-14)
    constant = small(decay="constant")
    assert [constant(t) for t in (4, 8, 12, 100)] == [1.0] * 4


def test_lars_poly_recipe():
    s = schedules.lars_poly(2.0, 256, 8192, steps_per_epoch=100, epochs=10, warmup_epochs=2, end_lr=1.0)
    assert (s.peak, s.total_steps, s.warmup_steps, s.decay, s.power) == (64.0, 1000, 200, "poly", 2.0)
    assert s(0) == 2.0
    assert s(100) == pytest.approx(2.0 + 62.0 / 2, rel=1e-14)
    assert s(200) == 64.0
    assert s(600) == pytest.approx(1.0 + 63.0 * 0.25, rel=1e-14)
    assert s(1000) == s(5000) == pytest.approx(1.0, rel=1e-14)


# --------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------
def test_warmup_zero_is_no_warmup():
    for kind in ("gradual", "constant"):
        s = Schedule(peak=1.0, total_steps=8, warmup=kind, warmup_steps=0, warmup_start=0.1, decay="linear")
        assert s(0) == 1.0
        assert s(4) == pytest.approx(0.5, rel=1e-14)
    g = schedules.goyal(0.1, 256, 1024, steps_per_epoch=10, epochs=90, warmup_epochs=0)
    assert g(0) == pytest.approx(0.4, rel=1e-15)


@pytest.mark.parametrize(
    "decay, end_value",
    [("poly", 0.1), ("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)],
)
def test_warmup_equal_to_total(decay, end_value):
    s = Schedule(peak=1.0, total_steps=10, warmup="gradual", warmup_steps=10, warmup_start=0.0, decay=decay, end_lr=0.1)
    assert [s(t) for t in (0, 5, 9)] == pytest.approx([0.0, 0.5, 0.9], rel=1e-14)
    # D = T - W = 0: lr(T) is the decay's end value, and it stays there.
    assert s(10) == s(11) == s(10**9) == pytest.approx(end_value, rel=1e-14)


def test_step_past_the_end_stays_at_value_at_total():
    for s in (small(decay="poly", end_lr=0.05), small(decay="cosine"), small(decay="step", milestones=(12,), milestone_unit="step")):
        assert s(12) == s(13) == s(10**12)
    assert small(decay="step", milestones=(12,), milestone_unit="step")(11) == 1.0
    assert small(decay="step", milestones=(12,), milestone_unit="step")(12) == pytest.approx(0.1)


def test_numpy_integer_steps_and_purity():
    s = small(decay="cosine")
    assert s(np.int64(6)) == s(6) and isinstance(s(np.int32(6)), float)
    # Pure: evaluation order and repetition do not matter.
    forward = [s(t) for t in range(20)]
    backward = [s(t) for t in reversed(range(20))][::-1]
    assert forward == backward == [s(t) for t in range(20)]


def test_schedule_is_immutable():
    s = small()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.peak = 2.0  # type: ignore[misc]
    assert hash(s) == hash(small())


ROUND_TRIP_SCHEDULES = [
    schedules.goyal(0.1, 256, 8192, steps_per_epoch=156, epochs=90),
    schedules.goyal(0.1, 256, 8192, steps_per_epoch=156, epochs=90, warmup_start="peak/world_size", world_size=32),
    schedules.lars_poly(2.0, 256, 16384, steps_per_epoch=78, epochs=90, warmup_epochs=2.5, end_lr=1e-4),
    small(decay="step", milestones=(2, 3.5), steps_per_epoch=3),
    small(decay="step", milestones=(6, 9), milestone_unit="step"),
    small(warmup="constant", decay="cosine", end_lr=0.01),
    small(decay="linear"),
    Schedule(peak=0.5, total_steps=3),
]


@pytest.mark.parametrize("schedule", ROUND_TRIP_SCHEDULES, ids=lambda s: f"{s.warmup}-{s.decay}")
def test_config_round_trip_through_json(schedule):
    text = json.dumps(schedule.to_config())
    back = Schedule.from_config(json.loads(text))
    assert back == schedule
    steps = range(0, schedule.total_steps + 3, max(1, schedule.total_steps // 97))
    assert [back(t) for t in steps] == [schedule(t) for t in steps]
