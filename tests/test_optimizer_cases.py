"""The shared optimizer table itself: every optimizer and option is covered, ids are unique, bad rows are bad."""

from __future__ import annotations

import pytest

from hvd_largebatch import config
from optimizer_cases import (
    BAD_HYPERPARAMETERS,
    CASE_IDS,
    CASES,
    LR_KINDS,
    MINIMUM_CASES,
    NAMES,
    initial_weights,
    make_reference,
)


def test_the_table_does_not_shrink_and_ids_are_unique():
    assert len(CASES) >= MINIMUM_CASES, f"{len(CASES)} rows, fewer than {MINIMUM_CASES}"
    assert len(set(CASE_IDS)) == len(CASE_IDS)
    assert len({b.id for b in BAD_HYPERPARAMETERS}) == len(BAD_HYPERPARAMETERS)


def test_every_optimizer_meets_every_option():
    names = set(config.OPTIMIZER_NAMES)
    assert {c.name for c in CASES} == names
    for variant in ("plain", "no-decay", "decay-on", "excluded", "excluded-one-regex", "exclude-nothing",
                    "zero-init", "changing-lr", "combined-from-zero"):
        assert {c.name for c in CASES if c.variant == variant} == names, variant
    momentum_family = names - {"lamb"}
    for variant in ("nesterov", "nesterov-changing-lr", "no-momentum-correction", "momentum-0"):
        assert {c.name for c in CASES if c.variant == variant} == momentum_family, variant
    # clip: larc is LARS with clip; lars and clars are run with it switched on
    assert {c.name for c in CASES if c.hyper.get("clip")} == {"lars", "clars"}
    assert {c.lr_kind for c in CASES} == set(LR_KINDS)
    assert any(c.hyper.get("beta1") for c in CASES) and any(c.hyper.get("eps") for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_row_is_a_valid_core_configuration_whose_rules_pick_tensors(case):
    oracle = make_reference(case)
    assert len(oracle.decay) == len(NAMES)
    assert set(initial_weights(case)) == set(NAMES)
    for name in case.zero_init:
        assert not initial_weights(case)[name].any()


def test_the_exclusion_regexes_match_both_spellings_of_a_path():
    """The Keras adapter creates ``fc.weight`` at ``fc/weight``: the table's rules must decide the same."""
    for case in CASES:
        torch_style = make_reference(case)
        keras_style = make_reference(case, tuple(n.replace(".", "/") for n in NAMES))
        assert (torch_style.decay, torch_style.adapt) == (keras_style.decay, keras_style.adapt), case.id


@pytest.mark.parametrize("bad", BAD_HYPERPARAMETERS, ids=[b.id for b in BAD_HYPERPARAMETERS])
def test_every_bad_row_is_refused_by_the_core_naming_the_argument(bad):
    message = str(bad.core_error())
    named = next(iter(bad.hyper), "name")
    assert named in message, message
