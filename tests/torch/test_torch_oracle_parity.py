"""Float64 parity of every torch optimizer with the NumPy oracle over 20 steps (ALGORITHMS.md: rel err <= 1e-10).

One table (``torch_optimizer_cases.CASES``) crosses every optimizer with
Nesterov, LARC clip, decay on/off, excluded tensors, zero-initialised tensors
and an LR that changes every step (momentum correction, including a step at
LR 0); each runs on both the foreach and the single-tensor path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_optimizer_cases import (
    CASES,
    STEPS,
    TENSORS,
    initial_weights,
    make_reference,
    make_torch,
    reference_step,
    relative_error,
    torch_step,
)

TOLERANCE = 1e-10


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference_for_20_steps(case, foreach):
    weights = initial_weights(case)
    params, opt = make_torch(case, weights, foreach=foreach)
    oracle = make_reference(case)
    decisions = [(row["decay"], row["adapt"]) for row in opt.tensor_switches()]
    if case.name != "sgd":
        assert decisions == list(zip(oracle.decay, oracle.adapt)), "per-tensor switches differ from the oracle's"
    else:
        assert [d for d, _ in decisions] == oracle.decay
    for step in range(STEPS):
        torch_step(case, params, opt, step)
        weights = reference_step(case, oracle, weights, step)
    for name, _ in TENSORS:
        err = relative_error(params[name].detach().numpy(), weights[name])
        assert err <= TOLERANCE, f"{name}: relative error {err:.3e}"
    # the optimizer state matches too
    names = [name for name, _ in TENSORS]
    for i, name in enumerate(names):
        state = opt.state[params[name]]
        if case.name == "lamb":
            assert relative_error(state["exp_avg"].numpy(), oracle.state["mu"][i]) <= TOLERANCE
            assert relative_error(state["exp_avg_sq"].numpy(), oracle.state["nu"][i]) <= TOLERANCE
            assert state["step"] == oracle.state["step"] == STEPS
        else:
            assert relative_error(state["momentum_buffer"].numpy(), oracle.state["velocity"][i]) <= TOLERANCE
            assert state["prev_lr"] == oracle.state["prev_lr"] == case.lr(STEPS - 1)


def test_table_covers_every_optimizer_and_variant():
    names = {c.name for c in CASES}
    assert names == {"sgd", "lars", "larc", "clars", "lamb"}
    for required in ("nesterov", "changing-lr", "zero-init", "excluded", "no-decay", "decay-on"):
        assert {c.name for c in CASES if c.variant == required} >= (names - ({"lamb"} if "nesterov" in required else set()))
    assert {c.name for c in CASES if c.variant == "clip"} == {"lars", "clars"}  # larc is clip already


def test_weights_moved_from_initial_values():
    case = next(c for c in CASES if c.id == "lars-plain")
    weights = initial_weights(case)
    params, opt = make_torch(case, weights)
    for step in range(3):
        torch_step(case, params, opt, step)
    assert not np.allclose(params["conv1.weight"].detach().numpy(), weights["conv1.weight"])
    assert torch.isfinite(params["conv1.weight"]).all()
