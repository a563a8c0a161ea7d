"""The schedule pieces, the optimizer registry and the shared errors of the core, one job each."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest

from hvd_largebatch import config, schedules
from hvd_largebatch.errors import HorovodNotInitialisedError, plain_batchnorm_with_dual_bn
from hvd_largebatch.schedules import decay, warmup

PIECE_MODULES = [
    "hvd_largebatch.schedules.batch",
    "hvd_largebatch.schedules.scaling",
    "hvd_largebatch.schedules.warmup",
    "hvd_largebatch.schedules.decay",
    "hvd_largebatch.schedules.record",
    "hvd_largebatch.schedules.builder",
    "hvd_largebatch.schedules.recipes",
    "hvd_largebatch.schedules.correction",
    "hvd_largebatch.errors",
]


@pytest.mark.parametrize("module_name", PIECE_MODULES)
def test_docstring_examples_of_every_piece(module_name):
    failures, tried = doctest.testmod(importlib.import_module(module_name), optionflags=doctest.ELLIPSIS)
    assert failures == 0
    assert tried > 0, f"{module_name} has no runnable example"


def test_the_tables_are_the_kinds_the_package_exports():
    assert schedules.DECAY_KINDS == tuple(decay.DECAYS) == ("step", "poly", "cosine", "linear", "constant")
    assert schedules.WARMUP_KINDS == tuple(warmup.WARMUPS) == ("gradual", "constant", "none")


def test_the_record_joins_the_warmup_piece_and_the_decay_piece_at_w():
    s = schedules.make_schedule(0.5, 20, peak=2.0, warmup_steps=5, decay="poly", power=3.0, end_lr=0.1)
    for t in range(5):
        assert s(t) == warmup.gradual_warmup(t, 5, 0.5, 2.0)
    for t in range(5, 25):
        assert s(t) == decay.poly_decay(decay.decay_progress(min(t, 20), 5, 20), 2.0, 0.1, 3.0)


def test_a_new_decay_kind_is_one_table_entry(monkeypatch):
    exponential = decay.DecayKind(
        lambda s, t: s.end_lr + (s.peak - s.end_lr) * math.exp(-5 * decay.decay_progress(t, s.warmup_steps, s.total_steps)),
        lambda s: f"exponential decay to {s.end_lr:g}",
        ends_at_end_lr=True,
    )
    monkeypatch.setitem(decay.DECAYS, "exponential", exponential)
    s = schedules.Schedule(peak=1.0, total_steps=10, decay="exponential", end_lr=0.0)
    assert s(0) == 1.0 and s(10) == pytest.approx(math.exp(-5))
    assert s.describe() == "no warmup, peak 1, then exponential decay to 0; 10 steps"
    assert schedules.Schedule.from_config(s.to_config()) == s
    with pytest.raises(ValueError, match="end_lr must be <= peak for decay='exponential'"):
        schedules.Schedule(peak=1.0, total_steps=10, decay="exponential", end_lr=2.0)


def test_momentum_correction_is_the_same_factor_for_numbers_and_arrays():
    prev = np.array([0.0, 0.1, 0.4, 3.2])
    new = np.array([0.1, 0.3, 0.2, 3.2])
    arrays = schedules.momentum_correction(prev, new, xp=np)
    numbers = [schedules.momentum_correction(float(p), float(n)) for p, n in zip(prev, new)]
    assert arrays.tolist() == numbers == [1.0, 0.3 / 0.1, 0.5, 1.0]
    with pytest.raises(ValueError, match="prev_lr must be >= 0"):
        schedules.momentum_correction(-1.0, 0.1)


def test_the_optimizer_registry_fixes_settings_and_refuses_contradictions():
    assert config.OPTIMIZER_NAMES == tuple(config.OPTIMIZERS) == ("sgd", "lars", "larc", "clars", "lamb")
    key, spec, kwargs = config.resolve_optimizer("LARC", {"lr": 0.3, "clip": True})
    assert (key, spec.record_type, kwargs) == ("larc", config.LARSConfig, {"lr": 0.3, "clip": True})
    with pytest.raises(ValueError, match="clip=False contradicts optimizer 'larc', which sets clip=True"):
        config.resolve_optimizer("larc", {"clip": False})
    with pytest.raises(ValueError, match="name must be one of 'sgd', 'lars', 'larc', 'clars', 'lamb'; got 'adam'"):
        config.resolve_optimizer("adam", {})


@pytest.mark.parametrize(
    "check, args, message",
    [
        (config.check_int_in_range, ("rank", 2, 0, 2), r"rank must be an integer in \[0, 2\), got 2"),
        (config.check_int_in_range, ("last_epoch", -2, -1), r"last_epoch must be an integer >= -1, got -2"),
        (config.check_non_negative_int, ("seed", 1.0), r"seed must be an integer >= 0, got 1.0"),
        (config.check_non_negative_int, ("seed", True), r"seed must be an integer >= 0, got True"),
        (config.check_choice, ("verbose", True, (0, 1, 2)), r"verbose must be one of 0, 1, 2; got True"),
    ],
)
def test_integer_and_choice_checks_name_the_argument(check, args, message):
    with pytest.raises(ValueError, match=message):
        check(*args)


def test_the_integer_checks_accept_numpy_integers():
    assert config.check_int_in_range("rank", np.int64(1), 0, 2) == 1
    assert config.check_non_negative_int("step", np.int32(0)) == 0


def test_shared_errors():
    error = HorovodNotInitialisedError("horovod.tensorflow")
    assert isinstance(error, RuntimeError) and "call horovod.tensorflow.init()" in str(error)
    many = plain_batchnorm_with_dual_bn("hvd_largebatch.torch_impl", ["a", "b", "c", "d"])
    assert isinstance(many, ValueError) and "(a, b, c, ...)" in str(many)
