"""The fused path (torch's fused SGD kernel, the default where it applies) equals the single-tensor path in float64.

Every SGD/LARS/LARC/CLARS row of the shared table (LAMB has no fused path)
runs 20 steps both ways; Nesterov and momentum-0 rows must not reach the
kernel, every other row must; a step whose
gradient holds a NaN (step 5) or an Inf (step 11) must be skipped by both,
with no weight or state touched. The fused path differs from the reference
only in rounding (module doc of ``momentum_functional.py``), so the
comparison allows 1e-12 relative to each tensor's scale.
"""

from __future__ import annotations

import math

import pytest
import torch

from optimizer_cases import CASES, STEPS, TENSORS, gradients, initial_weights, relative_error
from torch_adapter import make_torch, state_snapshot, torch_step

#: The momentum-family rows (LAMB has no fused path).
FUSED_CASES = [case for case in CASES if case.name != "lamb"]

#: Steps whose gradients are poisoned (fc.weight[1, 2]) and must be skipped.
POISONED = {5: math.nan, 11: math.inf}
TOLERANCE = 1e-12


def _run(case, **path):
    params, opt = make_torch(case, initial_weights(case), **path)
    if case.adaptive:
        opt.record_trust_ratios()
    ratios = []
    for step in range(STEPS):
        grads = gradients(step)
        if step in POISONED:
            grads["fc.weight"] = grads["fc.weight"].copy()
            grads["fc.weight"][1, 2] = POISONED[step]
        torch_step(case, params, opt, step, grads=grads)
        if case.adaptive and step not in POISONED:
            ratios.append(opt.trust_ratios())
    return params, opt, ratios


@pytest.mark.filterwarnings("ignore:.*skipped.*:RuntimeWarning")  # the skip warnings have their own tests
@pytest.mark.parametrize("case", FUSED_CASES, ids=[case.id for case in FUSED_CASES])
def test_fused_equals_single_tensor_with_skipped_steps(case, monkeypatch):
    calls = []
    kernel = torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda *a, **k: (calls.append(len(a[0])), kernel(*a, **k)))
    p_fused, o_fused, r_fused = _run(case)  # the default: fused where it applies
    fused_calls = len(calls)
    p_single, o_single, r_single = _run(case, foreach=False, fused=False)
    assert len(calls) == fused_calls, "the reference run used the fused kernel"
    if case.hyper.get("nesterov") or case.hyper.get("momentum") == 0.0:
        assert fused_calls == 0, "Nesterov momentum and momentum 0 are not the fused kernel's rule"
    else:
        assert fused_calls > 0, "the default path never used the fused kernel"
    assert o_fused.skipped_steps == o_single.skipped_steps == len(POISONED)
    errors = {
        name: relative_error(p_fused[name].detach().numpy(), p_single[name].detach().numpy()) for name, _ in TENSORS
    }
    s_fused, s_single = state_snapshot(o_fused), state_snapshot(o_single)
    assert s_fused.keys() == s_single.keys()
    for key, value in s_fused.items():
        if isinstance(value, float) or hasattr(value, "shape"):
            errors[key] = relative_error(value, s_single[key])
        else:
            assert value == s_single[key], key
    for step, (a, b) in enumerate(zip(r_fused, r_single)):
        assert a.keys() == b.keys()
        errors.update({f"ratio {step} {n}": abs(a[n] - b[n]) / max(abs(b[n]), 1e-300) for n in a})
    worst = {key: error for key, error in errors.items() if error > TOLERANCE}
    assert not worst, f"fused vs single-tensor relative errors above {TOLERANCE:g}: {worst}"
