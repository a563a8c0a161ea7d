"""``fused="numba"`` (compiled single-pass loops, ``cpu_kernels.py``) equals the single-tensor path.

Every row of the shared table (SGD, LARS, LARC, CLARS, LAMB and their
variants) runs 20 steps both ways in float64, with a NaN gradient at step 5
and an Inf at step 11 that both must skip; weights, state and trust ratios
must agree to 1e-12 relative (the loops differ only in rounding: sums
reassociated, multiply-adds fused), and the compiled loops must have run.
float32 rows check the vectorised loops themselves; non-contiguous tensors
must take the single-tensor rule and half-precision ones their float32
working copies, and still be right.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import pytest
import torch

from hvd_largebatch.torch_impl import LAMB, LARS, SGD, cpu_kernels, numba_kernels
from optimizer_cases import CASES
from torch_adapter import errors_above, run_with_poisoned_steps
TOLERANCE = 1e-12
ENTRY_POINTS = ("sums_of_squares", "paired_sums_of_squares", "momentum_steps", "nesterov_steps", "lamb_moments",
                "lamb_apply")


@pytest.fixture
def loop_calls(monkeypatch):
    """Counts the calls of each compiled entry point."""
    calls = dict.fromkeys(ENTRY_POINTS, 0)
    for name in ENTRY_POINTS:
        loop = getattr(numba_kernels, name)

        def counted(*args, _loop=loop, _name=name):
            calls[_name] += 1
            return _loop(*args)

        monkeypatch.setattr(numba_kernels, name, counted)
    return calls


@pytest.mark.filterwarnings("ignore:.*skipped.*:RuntimeWarning")  # the skip warnings have their own tests
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_numba_equals_single_tensor_with_skipped_steps(case, loop_calls):
    compiled = run_with_poisoned_steps(case, fused="numba")
    used = dict(loop_calls)
    reference = run_with_poisoned_steps(case, foreach=False, fused=False)
    assert loop_calls == used, "the reference run used the compiled loops"
    if case.name == "lamb":
        expected = {"sums_of_squares", "lamb_moments", "lamb_apply"}
    else:
        expected = {"paired_sums_of_squares" if case.adaptive else "sums_of_squares",
                    "nesterov_steps" if case.hyper.get("nesterov") else "momentum_steps"}
    assert {name for name, count in used.items() if count} == expected
    worst = errors_above(compiled, reference, TOLERANCE)
    assert not worst, f"numba vs single-tensor relative errors above {TOLERANCE:g}: {worst}"


@pytest.mark.filterwarnings("ignore:.*skipped.*:RuntimeWarning")
@pytest.mark.parametrize("name", ["sgd", "lars", "lamb"])
def test_float32_loops_match_the_single_tensor_path(name):
    case = next(c for c in CASES if c.name == name)
    worst = errors_above(run_with_poisoned_steps(case, torch.float32, fused="numba"),
                         run_with_poisoned_steps(case, torch.float32, foreach=False, fused=False), 2e-5)
    assert not worst, f"float32 numba vs single-tensor relative errors above 2e-5: {worst}"


def _unserved_run(**path):
    torch.manual_seed(0)
    served = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    transposed = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64).t())
    half = torch.nn.Parameter(torch.randn(6, dtype=torch.float16))
    assert not transposed.is_contiguous()
    opt = LARS([served, transposed, half], lr=0.5, momentum=0.9, weight_decay=1e-3, **path)
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for p in (served, transposed, half):
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
        opt.step()
    return [p.detach().double() for p in (served, transposed, half)]


def test_unserved_tensors_take_the_other_paths(loop_calls):
    """A transposed (non-contiguous) weight beside a served one, and a float16 one: all updated right.

    The float16 weight is updated through a float32 working copy, which the loops serve (a second call
    per step, for the float32 bucket); the transposed one takes the single-tensor rule.
    """
    compiled = _unserved_run(fused="numba")
    assert loop_calls["momentum_steps"] == 6
    for a, b in zip(compiled, _unserved_run(fused=False, foreach=False)):
        torch.testing.assert_close(a, b, rtol=1e-12 if a.numel() != 6 else 1e-3, atol=0)


def test_huge_float32_gradient_is_skipped_like_on_torchs_path():
    """sum(g**2) overflows float32 for a finite g of 1e20: both paths call it non-finite and skip."""
    for fused in ("numba", True):
        w = torch.nn.Parameter(torch.ones(8))
        opt = SGD([w], lr=0.1, momentum=0.9, fused=fused)
        w.grad = torch.full((8,), 1e20)
        with pytest.warns(RuntimeWarning, match="skipped"):
            opt.step()
        assert opt.skipped_steps == 1 and torch.equal(w.detach(), torch.ones(8)), fused


def test_fused_keyword_is_checked():
    with pytest.raises(ValueError, match="fused must be None, True, False or 'numba', got 'yes'"):
        LARS([torch.zeros(2, requires_grad=True)], fused="yes")
    with pytest.raises(ValueError, match="fused must be None, True, False or 'numba', got 'Numba'"):
        LAMB([torch.zeros(2, requires_grad=True)], fused="Numba")


def test_missing_numba_is_named_when_the_optimizer_is_built(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba now raises ImportError
    monkeypatch.delitem(sys.modules, "hvd_largebatch.torch_impl.numba_kernels")
    with pytest.raises(ImportError, match=r"fused='numba' needs the numba package \(pip install numba"):
        LARS([torch.zeros(2, requires_grad=True)], fused="numba")
    # the default path does not need numba: without it, one thread takes torch's kernels, silently
    monkeypatch.setattr(cpu_kernels, "_importable", functools.cache(cpu_kernels._importable.__wrapped__))
    with intra_op_threads(1):
        assert _default_path_steps(LARS, lr=0.1, momentum=0.9) == 2


@contextlib.contextmanager
def intra_op_threads(count: int):
    """torch's intra-op thread count set to ``count`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _default_path_steps(optimizer_type, **hyper) -> int:
    """Runs two steps of ``optimizer_type`` on the default ``fused``; returns how many were taken."""
    w = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = optimizer_type([w], **hyper)
    for _ in range(2):
        w.grad = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
        opt.step()
    assert not torch.equal(w.detach(), torch.ones(5, dtype=torch.float64))
    return 2 - opt.skipped_steps


@pytest.mark.parametrize("optimizer_type, hyper, loop", [
    (SGD, dict(lr=0.1, momentum=0.9), "momentum_steps"),
    (LARS, dict(lr=0.1, momentum=0.9, nesterov=True), "nesterov_steps"),
    (LAMB, dict(lr=0.01), "lamb_apply"),
])
def test_default_takes_the_loops_on_one_thread_only(optimizer_type, hyper, loop, loop_calls):
    """``fused=None`` runs the compiled loops with one intra-op thread and torch's kernels with two."""
    with intra_op_threads(2):
        _default_path_steps(optimizer_type, **hyper)
    assert not any(loop_calls.values()), "two threads took the compiled loops"
    with intra_op_threads(1):
        _default_path_steps(optimizer_type, **hyper)
    assert loop_calls[loop] == 2
