"""Float64 parity of every torch optimizer with the NumPy oracle over 20 steps (ALGORITHMS.md: rel err <= 1e-10).

The shared table (``tests/optimizer_cases.py``, core spelling) crosses every
optimizer with Nesterov, LARC clip, decay on/off, excluded tensors,
zero-initialised tensors and LRs that change every step (momentum
correction, including a step at LR 0); ``torch_adapter`` turns each row into
torch arguments, and each runs on both the foreach and the single-tensor path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimizer_cases import (
    CASE_IDS,
    CASES,
    NAMES,
    STEPS,
    TOLERANCE,
    case_named,
    initial_weights,
    make_reference,
    parity_errors,
    reference_step,
)
from torch_adapter import make_torch, prev_lr_and_steps, state_in_core_names, torch_step


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_for_20_steps(case, foreach):
    weights = initial_weights(case)
    params, opt = make_torch(case, weights, foreach=foreach)
    oracle = make_reference(case)
    switches = [(row["decay"], row["adapt"]) for row in opt.tensor_switches()]
    expected_switches = list(zip(oracle.decay, oracle.adapt))
    if not case.adaptive:  # SGD reports no layer adaptation
        switches, expected_switches = [d for d, _ in switches], [d for d, _ in expected_switches]
    assert switches == expected_switches, "per-tensor (decay, adapt) switches differ from the oracle's"
    for step in range(STEPS):
        torch_step(case, params, opt, step)
        weights = reference_step(case, oracle, weights, step)
    ours = {n: p.detach().numpy() for n, p in params.items()}
    errors = parity_errors(case, ours, state_in_core_names(case, params, opt), oracle, weights)
    worst = {k: v for k, v in errors.items() if v > TOLERANCE}
    assert not worst, f"relative errors above {TOLERANCE:g}: {worst}"
    scalars = prev_lr_and_steps(case, params, opt)
    expected = oracle.state["prev_lr"] if case.has_momentum_buffer else oracle.state["step"]
    assert scalars == {n: expected for n in NAMES}
    assert opt.skipped_steps == oracle.state["skipped"] == 0


def test_weights_moved_from_initial_values():
    case = case_named("lars-plain")
    weights = initial_weights(case)
    params, opt = make_torch(case, weights)
    for step in range(3):
        torch_step(case, params, opt, step)
    assert not np.allclose(params["conv1.weight"].detach().numpy(), weights["conv1.weight"])
    assert torch.isfinite(params["conv1.weight"]).all()
