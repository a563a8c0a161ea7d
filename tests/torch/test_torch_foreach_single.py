"""The foreach path and the single-tensor path give the same float64 results, for every case of the table.

(The fused path is checked against the single-tensor path in ``test_torch_fused.py``.)

The foreach path is run with a tiny chunk budget so that the cache-sized
chunking cuts the tensor list in several places, and on tensors of two dtypes
(two device/dtype buckets).
"""

from __future__ import annotations

import pytest
import torch

from hvd_largebatch.torch_impl import lamb_update, momentum_update, tensor_lists
from optimizer_cases import CASE_IDS, CASES, STEPS, TENSORS, initial_weights
from torch_adapter import make_torch, state_snapshot, torch_step


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_foreach_equals_single_tensor(case, monkeypatch):
    monkeypatch.setattr(tensor_lists, "CPU_CHUNK_NUMEL", 50)  # several chunks per bucket
    weights = initial_weights(case)
    runs = {}
    for foreach in (True, False):
        path = {} if case.name == "lamb" else {"fused": False}  # LAMB has no fused path
        params, opt = make_torch(case, weights, foreach=foreach, **path)
        opt.record_trust_ratios(case.name != "sgd")
        for step in range(STEPS):
            torch_step(case, params, opt, step)
        runs[foreach] = (params, opt)
    (p_fe, o_fe), (p_st, o_st) = runs[True], runs[False]
    for name, _ in TENSORS:
        torch.testing.assert_close(p_fe[name], p_st[name], rtol=1e-14, atol=0, msg=name)
    s_fe, s_st = state_snapshot(o_fe), state_snapshot(o_st)
    assert s_fe.keys() == s_st.keys()
    for key in s_fe:
        torch.testing.assert_close(torch.as_tensor(s_fe[key]), torch.as_tensor(s_st[key]), rtol=1e-14, atol=0, msg=key)
    if case.name != "sgd":
        ratios_fe, ratios_st = o_fe.trust_ratios(), o_st.trust_ratios()
        assert ratios_fe.keys() == {n for n, _ in TENSORS}
        assert ratios_fe == pytest.approx(ratios_st, rel=1e-14)


def test_chunks_cover_the_list_in_order():
    tensors = [torch.zeros(n) for n in (30, 30, 100, 5, 5, 5, 60)]
    chunks = tensor_lists.cache_sized_chunks(tensors, chunk_numel=64)
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 3), (3, 6), (6, 7)]
    assert tensor_lists.cache_sized_chunks(tensors, chunk_numel=0) == [slice(0, 7)]
    assert tensor_lists.cache_sized_chunks([]) == []


def _mixed_dtype_lists():
    torch.manual_seed(0)
    shapes = [(6, 5), (5,), (3, 4, 2), (7,)]
    dtypes = [torch.float64, torch.float32, torch.float64, torch.float32]
    params = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    return params, grads


@pytest.mark.parametrize("nesterov,clip,adapt", [(False, False, True), (True, False, True), (False, True, True), (True, False, None)])
def test_functional_momentum_update_paths_agree_on_mixed_dtypes(nesterov, clip, adapt, monkeypatch):
    monkeypatch.setattr(tensor_lists, "CPU_CHUNK_NUMEL", 20)
    params, grads = _mixed_dtype_lists()
    results = {}
    for foreach in (True, False):
        w = [p.clone() for p in params]
        v = [torch.full_like(p, 0.01) for p in params]
        out = [None] * len(w) if adapt else None
        momentum_update(
            w, grads, v, lr=0.5, momentum=0.9, weight_decay=0.01, decay=[True, False, True, False],
            velocity_corrections=[1.0, 2.0, 0.5, 1.0], nesterov=nesterov,
            adapt=[True, False, True, True] if adapt else None, clip=clip, foreach=foreach, local_rates_out=out,
        )
        results[foreach] = (w, v, out)
    for a, b in zip(results[True][0] + results[True][1], results[False][0] + results[False][1]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6 if a.dtype == torch.float32 else 1e-14, atol=0)
    if adapt:
        assert results[True][2][1].item() == 1.0  # not adapted
        assert all(r is not None for r in results[True][2])


def test_functional_lamb_update_paths_agree_on_mixed_dtypes(monkeypatch):
    monkeypatch.setattr(tensor_lists, "CPU_CHUNK_NUMEL", 20)
    params, grads = _mixed_dtype_lists()
    results = {}
    for foreach in (True, False):
        w = [p.clone() for p in params]
        mu = [torch.full_like(p, 0.01) for p in params]
        nu = [torch.full_like(p, 0.02) for p in params]
        lamb_update(
            w, grads, mu, nu, [1, 3, 2, 1], lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
            decay=[True, False, True, False], adapt=[True, True, False, True], foreach=foreach,
        )
        results[foreach] = w + mu + nu
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-6 if a.dtype == torch.float32 else 1e-14, atol=0)
