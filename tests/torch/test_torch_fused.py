"""``fused=True`` (torch's fused SGD kernel where it applies) equals the single-tensor path in float64.

Every SGD/LARS/LARC/CLARS row of the shared table (LAMB has no fused path)
runs 20 steps both ways; Nesterov and momentum-0 rows must not reach the
kernel, every other row must; a step whose
gradient holds a NaN (step 5) or an Inf (step 11) must be skipped by both,
with no weight or state touched. The fused path differs from the reference
only in rounding (module doc of ``momentum_functional.py``), so the
comparison allows 1e-12 relative to each tensor's scale.
"""

from __future__ import annotations

import pytest
import torch

from optimizer_cases import CASES
from torch_adapter import errors_above, run_with_poisoned_steps

#: The momentum-family rows (LAMB has no fused path).
FUSED_CASES = [case for case in CASES if case.name != "lamb"]
TOLERANCE = 1e-12


@pytest.mark.filterwarnings("ignore:.*skipped.*:RuntimeWarning")  # the skip warnings have their own tests
@pytest.mark.parametrize("case", FUSED_CASES, ids=[case.id for case in FUSED_CASES])
def test_fused_equals_single_tensor_with_skipped_steps(case, monkeypatch):
    calls = []
    kernel = torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda *a, **k: (calls.append(len(a[0])), kernel(*a, **k)))
    fused = run_with_poisoned_steps(case, fused=True)
    fused_calls = len(calls)
    reference = run_with_poisoned_steps(case, foreach=False, fused=False)
    assert len(calls) == fused_calls, "the reference run used the fused kernel"
    if case.hyper.get("nesterov") or case.hyper.get("momentum") == 0.0:
        assert fused_calls == 0, "Nesterov momentum and momentum 0 are not the fused kernel's rule"
    else:
        assert fused_calls > 0, "fused=True never used the fused kernel"
    worst = errors_above(fused, reference, TOLERANCE)
    assert not worst, f"fused vs single-tensor relative errors above {TOLERANCE:g}: {worst}"
