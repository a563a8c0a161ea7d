"""Optimizer state: round trips, non-finite gradients, param groups that survive Horovod's rebuild, trust-ratio stats."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from hvd_largebatch import config, reference
from hvd_largebatch.torch_impl import CLARS, LAMB, LARS, SGD, create_optimizer
from optimizer_cases import CASE_IDS, CASES, TENSORS, case_named, clars_norms, gradients, initial_weights, one_case_per_optimizer
from torch_adapter import make_torch, state_snapshot, torch_step

ONE_PER_OPTIMIZER = one_case_per_optimizer("changing-lr")


def _assert_same_state(a, b):
    sa, sb = state_snapshot(a), state_snapshot(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], np.ndarray):
            assert np.array_equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_restored_copy_stepped_in_lockstep_stays_equal(case):
    weights = initial_weights(case)
    params, opt = make_torch(case, weights)
    for step in range(7):
        torch_step(case, params, opt, step)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": {n: p.detach().clone() for n, p in params.items()}}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other_params, other = make_torch(case, initial_weights(case, seed=9))  # different weights, fresh state
    with torch.no_grad():
        for name, p in other_params.items():
            p.copy_(saved["params"][name])
    other.load_state_dict(saved["opt"])
    _assert_same_state(opt, other)
    assert other.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for step in range(7, 14):
        torch_step(case, params, opt, step)
        torch_step(case, other_params, other, step)
    for name, _ in TENSORS:
        assert torch.equal(params[name], other_params[name]), name
    _assert_same_state(opt, other)


@pytest.mark.parametrize("case", ONE_PER_OPTIMIZER, ids=[c.name for c in ONE_PER_OPTIMIZER])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradient_skips_the_step_and_counts(case, bad):
    weights = initial_weights(case)
    params, opt = make_torch(case, weights)
    twin_params, twin = make_torch(case, weights)
    for step in range(3):
        torch_step(case, params, opt, step)
        torch_step(case, twin_params, twin, step)
    before = {n: p.detach().clone() for n, p in params.items()}
    snapshot = state_snapshot(opt)
    grads = gradients(3)
    grads["fc.weight"] = grads["fc.weight"].copy()
    grads["fc.weight"][1, 2] = bad
    torch_step(case, params, opt, 3, grads=grads)
    assert opt.skipped_steps == 1
    for name, p in params.items():
        assert torch.equal(p, before[name]), name
    after = state_snapshot(opt)
    after["skipped_steps"] -= 1
    assert after.keys() == snapshot.keys()
    for key in after:
        assert np.array_equal(after[key], snapshot[key]) if isinstance(after[key], np.ndarray) else after[key] == snapshot[key]
    # the next finite step continues as if the bad one never happened
    torch_step(case, params, opt, 4)
    torch_step(case, twin_params, twin, 4)
    for name in params:
        assert torch.equal(params[name], twin_params[name])
    assert opt.state_dict()["skipped_steps"] == 1


@pytest.mark.parametrize("name", config.OPTIMIZER_NAMES)
def test_nonfinite_on_first_step_creates_no_state_and_raise_policy_raises(name):
    case = case_named(f"{name}-plain")
    params, opt = make_torch(case, initial_weights(case))
    grads = gradients(0)
    grads["conv1.weight"] = np.full_like(grads["conv1.weight"], np.nan)
    torch_step(case, params, opt, 0, grads=grads)
    assert opt.skipped_steps == 1 and len(opt.state) == 0
    params, opt = make_torch(case, initial_weights(case), nonfinite="raise")
    before = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(FloatingPointError):
        torch_step(case, params, opt, 0, grads=grads)
    assert all(torch.equal(p, before[n]) for n, p in params.items()) and len(opt.state) == 0


def test_clars_nonfinite_per_example_norm_skips():
    case = case_named("clars-plain")
    params, opt = make_torch(case, initial_weights(case))
    before = {n: p.detach().clone() for n, p in params.items()}
    for name, p in params.items():
        p.grad = torch.tensor(gradients(0)[name])
    opt.set_grad_norms({**clars_norms(0), "head.weight": math.inf})
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in params.items())


def _horovod_style_rebuild(opt):
    """What horovod.torch.DistributedOptimizer does: a subclass built from ``param_groups`` alone."""
    cls = type(opt.__class__.__name__, (opt.__class__,), {})
    return cls(opt.param_groups)


@pytest.mark.parametrize("name", config.OPTIMIZER_NAMES)
def test_rebuilding_from_param_groups_keeps_hyperparameters_and_switches(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
    kwargs = dict(lr=0.37, weight_decay=0.03, exclude_from_weight_decay=[r"^2\."], foreach=False)
    if name != "sgd":
        kwargs["exclude_from_layer_adaptation"] = lambda n, shape: n.startswith("0.")
    if name in ("lars", "larc", "clars"):
        kwargs.update(trust_coefficient=0.02, eps=1e-5, nesterov=True)
    if name == "lamb":
        kwargs.update(betas=(0.8, 0.95), eps=1e-4)
    if name == "clars":
        kwargs.update(estimator="microbatch:3", chunk_size=7)
    opt = create_optimizer(name, model.named_parameters(), **kwargs)
    rebuilt = _horovod_style_rebuild(opt)
    assert rebuilt.tensor_switches() == opt.tensor_switches()
    for original, copied in zip(opt.param_groups, rebuilt.param_groups):
        assert {k: v for k, v in original.items() if k != "params"} == {k: v for k, v in copied.items() if k != "params"}
    switches = {row["name"]: row for row in opt.tensor_switches()}
    assert switches["2.weight"]["decay"] is False and switches["0.weight"]["decay"] is True
    if name != "sgd":
        assert switches["0.weight"]["adapt"] is False and switches["2.weight"]["adapt"] is True
    # the non-default hyperparameters are really used by the rebuilt optimizer
    assert rebuilt.param_groups[0]["lr"] == 0.37


def test_param_group_dicts_keep_their_own_values_and_names():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    named = list(model.named_parameters())
    opt = LARS(
        [{"params": named[:2], "lr": 0.5, "weight_decay": 0.1}, {"params": named[2:], "trust_coefficient": 0.01}],
        lr=0.2,
        weight_decay=0.0,
    )
    g0, g1 = opt.param_groups
    assert (g0["lr"], g0["weight_decay"], g0["trust_coefficient"]) == (0.5, 0.1, 0.001)
    assert (g1["lr"], g1["weight_decay"], g1["trust_coefficient"]) == (0.2, 0.0, 0.01)
    assert g0["param_names"] == ["0.weight", "0.bias"]
    assert g0["decay_mask"] == [True, False] and g0["adapt_mask"] == [True, False]


def test_exclusion_rules_see_full_names():
    model = torch.nn.ModuleDict({"subnet": torch.nn.Linear(3, 3), "bn1": torch.nn.Linear(3, 3)})
    opt = LARS(model.named_parameters())
    switches = {row["name"]: (row["decay"], row["adapt"]) for row in opt.tensor_switches()}
    assert switches["subnet.weight"] == (True, True)  # "bn" inside "subnet" does not match
    assert switches["bn1.weight"] == (False, False)  # a 2-D tensor excluded by its path
    unnamed = LARS(model.parameters())
    assert [row["adapt"] for row in unnamed.tensor_switches()] == [True, False, True, False]  # ndim rule only


def test_deepcopy_and_pickle_keep_skip_count_and_rules():
    params = [("w", torch.nn.Parameter(torch.ones(3, 3)))]
    opt = LARS(params, exclude_from_weight_decay=["w"])
    opt.skipped_steps = 4
    clone = copy.deepcopy(opt)
    assert clone.skipped_steps == 4 and clone._decay_rule == opt._decay_rule
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).skipped_steps == 4


def test_trust_ratios_are_the_oracle_local_rates_and_off_by_default():
    torch.manual_seed(3)
    w = torch.randn(5, 4, dtype=torch.float64)
    g = torch.randn(5, 4, dtype=torch.float64)
    b = torch.zeros(5, dtype=torch.float64)
    params = [("fc.weight", torch.nn.Parameter(w.clone())), ("fc.bias", torch.nn.Parameter(b.clone()))]
    opt = LARS(params, lr=0.1, weight_decay=0.01, trust_coefficient=0.02)
    params[0][1].grad, params[1][1].grad = g.clone(), torch.ones(5, dtype=torch.float64)
    opt.step()
    assert opt.trust_ratios() == {}
    opt.record_trust_ratios()
    params[0][1].grad = g.clone()
    w_now = params[0][1].detach().numpy().copy()
    opt.step()
    expected = reference.lars_local_lr(
        w_now, float(np.linalg.norm(g.numpy())), trust_coefficient=0.02, weight_decay=0.01, eps=0.0, decay=True, adapt=True
    )
    ratios = opt.trust_ratios()
    assert ratios["fc.weight"] == pytest.approx(expected, rel=1e-12)
    assert ratios["fc.bias"] == 1.0
    opt.record_trust_ratios(False)
    assert opt.trust_ratios() == {}


def test_lamb_trust_ratios_recorded():
    params = [("w", torch.nn.Parameter(torch.ones(4, 4)))]
    opt = LAMB(params, lr=0.01)
    opt.record_trust_ratios()
    params[0][1].grad = torch.full((4, 4), 0.5)
    opt.step()
    # first step: u = sign(g)(approximately) + 0.01 * w; r = ||w|| / ||u|| = 4 / (4 * 1.01)
    assert opt.trust_ratios()["w"] == pytest.approx(1 / 1.01, rel=1e-5)


def test_grads_none_are_skipped_and_state_is_per_tensor():
    a, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3, 3))
    for opt in (SGD([a, b]), LARS([a, b]), LAMB([a, b])):
        a.grad, b.grad = torch.ones(3, 3), None
        opt.step()
        assert a in opt.state and b not in opt.state
        a.grad = None


def test_sgd_matches_torch_sgd_at_constant_lr_without_decay():
    """Goyal's LR-inside-velocity form equals torch's form at a constant LR (no weight decay)."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 5)
    ours_w, torch_w = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = SGD([ours_w], lr=0.05, momentum=0.9)
    theirs = torch.optim.SGD([torch_w], lr=0.05, momentum=0.9)
    for _ in range(10):
        g = torch.randn(4, 5)
        ours_w.grad, torch_w.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(ours_w, torch_w, rtol=1e-5, atol=1e-6)


def test_clars_pending_norms_accumulate_over_calls():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    loss_fn = torch.nn.functional.cross_entropy
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    opt = CLARS(model.named_parameters(), estimator="exact")
    opt.add_grad_norms(model, loss_fn, x[:4], y[:4])
    opt.add_grad_norms(model, loss_fn, x[4:], y[4:])
    assert opt._pending_count == 8
    from hvd_largebatch.torch_impl import per_example_grad_norms

    whole = per_example_grad_norms(model, loss_fn, x, y)
    assert opt._pending_sums.shape == (1,)  # only the adapted tensor (the bias is excluded)
    assert opt._pending_sums.grad_fn is None
    torch.testing.assert_close(opt._pending_sums[0] / 8, whole["weight"], rtol=1e-6, atol=0)
