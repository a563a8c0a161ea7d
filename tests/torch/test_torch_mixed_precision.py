"""Mixed precision in the torch optimizers, single process: half-precision params, autocast and GradScaler.

* float16/bfloat16 params: the float32-math path against the float64 oracle
  fed the same (upcast) half weights and gradients, on both paths; 50 steps
  of training a small model with every optimizer; skips only for gradients
  that are really not finite; state float32 through a state-dict round trip;
* an fp32 model under ``torch.amp.GradScaler``: a step equals the step
  without the scaler, and a step the scaler skips leaves the momentum
  correction as if the step had not been attempted;
* autocast (bfloat16 on CPU) trains with every optimizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hvd_largebatch.torch_impl import create_optimizer
from hvd_largebatch.torch_impl.lamb_functional import lamb_update
from hvd_largebatch.torch_impl.momentum_functional import momentum_update
from optimizer_cases import CASES, STEPS, TENSORS, clars_norms, gradients, initial_weights, make_reference
from torch_adapter import torch_kwargs

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = ("sgd", "lars", "larc", "clars", "lamb")
PARITY_CASES = [c for c in CASES if c.variant in ("plain", "changing-lr", "zero-init")] + [
    c for c in CASES if c.variant in ("nesterov", "clip", "betas-eps")
]
# The float32 state against the float64 oracle's, fed identical inputs (float32 rounding only).
STATE_TOLERANCE = 1e-5


def _mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.float16: 10, torch.bfloat16: 7}[dtype]


def _spacing(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    smallest = torch.finfo(dtype).smallest_normal
    exponent = np.floor(np.log2(np.maximum(np.abs(values), smallest)))
    return np.exp2(exponent - _mantissa_bits(dtype))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("dtype", list(HALF), ids=list(HALF))
@pytest.mark.parametrize("case", PARITY_CASES, ids=[c.id for c in PARITY_CASES])
def test_half_params_follow_the_float64_oracle_on_upcast_inputs(case, dtype, foreach):
    """Each step: the oracle gets float64(w_half), float64(g_half); ours must land within one half ulp of it."""
    dtype = HALF[dtype]
    names = [name for name, _ in TENSORS]
    start = initial_weights(case)
    params = {n: torch.nn.Parameter(torch.tensor(start[n], dtype=dtype)) for n in names}
    opt = create_optimizer(case.name, list(params.items()), lr=case.lr(0), foreach=foreach, **torch_kwargs(case.hyper, case.name), **case.exclusions())
    oracle = make_reference(case)
    for step in range(STEPS):
        # small gradients: g*g underflows float16 and 1/(sqrt(nu)+eps) overflows it (LAMB's first step)
        raw = {n: g * 1e-3 for n, g in gradients(step).items()}
        for n, p in params.items():
            p.grad = torch.tensor(raw[n], dtype=dtype)
        for group in opt.param_groups:
            group["lr"] = case.lr(step)
        norms = None
        if case.name == "clars":
            opt.set_grad_norms({n: s * 1e-3 for n, s in clars_norms(step).items()})
            norms = [clars_norms(step)[n] * 1e-3 for n in names]
        upcast_w = [params[n].detach().double().numpy() for n in names]
        upcast_g = [params[n].grad.double().numpy() for n in names]
        expected = oracle.step(upcast_w, upcast_g, case.lr(step), grad_norms=norms)
        opt.step()
        for n, want in zip(names, expected):
            got = params[n].detach().double().numpy()
            assert np.isfinite(got).all(), f"step {step} {n}: non-finite weight"
            off = np.abs(got - want) / _spacing(want, dtype)
            assert off.max() <= 1.0, f"step {step} {n}: {off.max():.2f} ulp from the oracle"
    assert opt.skipped_steps == 0
    for i, n in enumerate(names):
        state = opt.state[params[n]]
        pairs = (
            [("exp_avg", "mu"), ("exp_avg_sq", "nu")] if case.name == "lamb" else [("momentum_buffer", "velocity")]
        )
        for ours, theirs in pairs:
            assert state[ours].dtype == torch.float32
            want = oracle.state[theirs][i]
            err = np.max(np.abs(state[ours].double().numpy() - want)) / max(np.max(np.abs(want)), 1e-30)
            assert err <= STATE_TOLERANCE, f"{n}/{ours}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", list(HALF), ids=list(HALF))
@pytest.mark.parametrize("name", NAMES)
def test_foreach_and_single_tensor_paths_agree_on_half_params(name, dtype):
    dtype = HALF[dtype]
    case = next(c for c in CASES if c.name == name and c.variant == "plain")
    runs = []
    for foreach in (True, False):
        start = initial_weights(case)
        params = {n: torch.nn.Parameter(torch.tensor(start[n], dtype=dtype)) for n, _ in TENSORS}
        opt = create_optimizer(name, list(params.items()), lr=case.lr(0), foreach=foreach, **torch_kwargs(case.hyper, case.name), **case.exclusions())
        for step in range(STEPS):
            for n, p in params.items():
                p.grad = torch.tensor(gradients(step)[n], dtype=dtype)
            if name == "clars":
                opt.set_grad_norms(clars_norms(step))
            opt.step()
        runs.append((params, opt))
    (p_foreach, o_foreach), (p_single, o_single) = runs
    for n, _ in TENSORS:
        a, b = p_foreach[n].detach().double().numpy(), p_single[n].detach().double().numpy()
        assert (np.abs(a - b) / _spacing(b, dtype)).max() <= 1.0, n
        for key, value in o_foreach.state[p_foreach[n]].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, o_single.state[p_single[n]][key], rtol=1e-5, atol=1e-9)


def _classification_data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 12, generator=generator)
    y = (x[:, :3].sum(dim=1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def _mlp(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).to(dtype)


TRAIN_LR = {"sgd": 0.5, "lars": 3.0, "larc": 0.5, "clars": 3.0, "lamb": 0.02}
TRAIN_KWARGS = {"lars": {"trust_coefficient": 0.02}, "clars": {"trust_coefficient": 0.02}, "larc": {"trust_coefficient": 0.02}}


def _train_half(name: str, dtype: torch.dtype, steps: int, poison_step: int | None = None):
    """Trains the MLP in ``dtype`` with ``name``; at ``poison_step`` one gradient gets an Inf."""
    model = _mlp(dtype)
    opt = create_optimizer(name, model.named_parameters(), lr=TRAIN_LR[name], **TRAIN_KWARGS.get(name, {}))
    x, y = _classification_data()
    x = x.to(dtype)
    loss_fn = _loss
    losses, frozen = [], None
    for step in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        losses.append(loss.item())
        if name == "clars":
            opt.add_grad_norms(model, loss_fn, x, y)
        if step == poison_step:
            next(model.parameters()).grad[0, 0] = float("inf")
            frozen = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step == poison_step:
            assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters())), "a skipped step moved a weight"
    return model, opt, losses


@pytest.mark.parametrize("dtype", list(HALF), ids=list(HALF))
@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_trains_half_params_for_50_steps(name, dtype):
    dtype = HALF[dtype]
    model, opt, losses = _train_half(name, dtype, steps=50, poison_step=20)
    assert losses[-1] < 0.7 * losses[0], losses
    assert opt.skipped_steps == 1  # the poisoned step only
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32 and torch.isfinite(value).all()


@pytest.mark.parametrize("name", NAMES)
def test_a_finite_float16_gradient_whose_norm_exceeds_float16_is_not_skipped(name):
    # 4096 elements of 2000: every element is a float16 value, the norm (128000) is not
    w = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.float16))
    settings = {"sgd": dict(lr=1e-4), "lamb": dict(lr=0.01)}.get(name, dict(lr=10.0, trust_coefficient=0.01))
    opt = create_optimizer(name, [("fc.weight", w)], **settings)
    w.grad = torch.full_like(w, 2000.0)
    if name == "clars":
        opt.set_grad_norms({"fc.weight": 128000.0})
    opt.step()
    assert opt.skipped_steps == 0
    assert torch.isfinite(w).all() and not torch.equal(w, torch.ones_like(w))


@pytest.mark.parametrize("name", NAMES)
def test_half_state_stays_float32_through_a_state_dict_round_trip(name):
    model, opt, _ = _train_half(name, torch.float16, steps=3)
    saved = opt.state_dict()
    twin = _mlp(torch.float16)
    twin.load_state_dict(model.state_dict())
    restored = create_optimizer(name, twin.named_parameters(), lr=TRAIN_LR[name], **TRAIN_KWARGS.get(name, {}))
    restored.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert restored.state[q][key].dtype == torch.float32
                assert torch.equal(restored.state[q][key], value)  # bit for bit, not via float16
            else:
                assert restored.state[q][key] == value


def test_functional_rules_refuse_half_state_for_half_params():
    w = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"velocities\[0\] has dtype torch.float16 for a torch.float16 parameter"):
        momentum_update([w], [w.clone()], [torch.zeros_like(w)], lr=0.1, momentum=0.9, weight_decay=0.0,
                        decay=[False], velocity_corrections=[1.0])
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] has dtype torch.float16"):
        lamb_update([w], [w.clone()], [torch.zeros(3)], [torch.zeros_like(w)], [1], lr=0.1, beta1=0.9, beta2=0.999,
                    eps=1e-6, weight_decay=0.0, decay=[False], adapt=[True])


# --------------------------------------------------------------------------- GradScaler and autocast
def _fp32_run(name: str, lrs: list[float], scaler: torch.amp.GradScaler | None, poison: int | None = None,
              omit: int | None = None, use_autocast: bool = False):
    """Trains the fp32 MLP with a per-step LR; ``poison`` makes the loss Inf (the scaler skips), ``omit`` leaves a step out."""
    model = _mlp(torch.float32)
    opt = create_optimizer(name, model.named_parameters(), lr=lrs[0], **TRAIN_KWARGS.get(name, {}))
    data_x, data_y = _classification_data()
    loss_fn = _loss
    for step, lr in enumerate(lrs):
        if step == omit:
            continue
        rows = torch.arange(32 * step, 32 * step + 64) % len(data_x)  # a batch of its own per step
        x, y = data_x[rows], data_y[rows]
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            loss = loss_fn(model(x), y)
        if step == poison:
            loss = loss * float("inf")
        if name == "clars":
            opt.add_grad_norms(model, loss_fn, x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    return model, opt


LRS = [0.5, 0.7, 0.9, 1.0, 0.8, 0.6]


@pytest.mark.parametrize("name", NAMES)
def test_a_step_under_grad_scaler_equals_the_step_without_it(name):
    lrs = [TRAIN_LR[name] * f for f in LRS]
    plain, plain_opt = _fp32_run(name, lrs, None)
    scaled, scaled_opt = _fp32_run(name, lrs, torch.amp.GradScaler("cpu", init_scale=2.0**14))
    for (n, a), b in zip(plain.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=n)
    if name != "sgd":
        assert plain_opt.param_groups[0]["lr"] == scaled_opt.param_groups[0]["lr"]


@pytest.mark.parametrize("name", ["sgd", "lars", "larc", "clars"])
def test_a_step_skipped_by_grad_scaler_keeps_momentum_correction_consistent(name):
    """The skipped step is as if it had not been attempted: the next step corrects from the last applied LR."""
    lrs = [TRAIN_LR[name] * f for f in LRS]
    skipped, skipped_opt = _fp32_run(name, lrs, torch.amp.GradScaler("cpu", init_scale=2.0**14), poison=2)
    omitted, omitted_opt = _fp32_run(name, lrs, None, omit=2)
    for (n, a), b in zip(omitted.named_parameters(), skipped.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=n)
        for key in ("momentum_buffer", "prev_lr"):
            want, got = omitted_opt.state[a][key], skipped_opt.state[b][key]
            if isinstance(want, torch.Tensor):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
            else:
                assert got == want
    assert skipped_opt.skipped_steps == 0  # the scaler skipped it, not the optimizer


@pytest.mark.parametrize("name", NAMES)
def test_autocast_bfloat16_with_grad_scaler_trains_every_optimizer(name):
    lrs = [TRAIN_LR[name]] * 30
    x, y = _classification_data()
    before = torch.nn.functional.cross_entropy(_mlp(torch.float32)(x), y).item()
    model, opt = _fp32_run(name, lrs, torch.amp.GradScaler("cpu"), use_autocast=True)
    after = torch.nn.functional.cross_entropy(model(x), y).item()
    assert after < 0.7 * before, (before, after)
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()


# --------------------------------------------------------------------------- GPU only (skipped without CUDA)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: float16 autocast and GradScaler on CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_autocast_float16_with_grad_scaler_trains_every_optimizer(name):
    device = torch.device("cuda")
    model = _mlp(torch.float32).to(device)
    opt = create_optimizer(name, model.named_parameters(), lr=TRAIN_LR[name], **TRAIN_KWARGS.get(name, {}))
    scaler = torch.amp.GradScaler("cuda")
    x, y = (t.to(device) for t in _classification_data())
    before = _loss(model(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = _loss(model(x), y)
        scaler.scale(loss).backward()
        if name == "clars":
            opt.add_grad_norms(model, _loss, x, y)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    assert _loss(model(x), y).item() < 0.7 * before
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: half parameters on CUDA")
@pytest.mark.parametrize("dtype", list(HALF), ids=list(HALF))
@pytest.mark.parametrize("name", NAMES)
def test_cuda_half_params_foreach_equals_single_tensor(name, dtype):
    dtype = HALF[dtype]
    runs = []
    for foreach in (True, False):
        model = _mlp(dtype).cuda()
        opt = create_optimizer(name, model.named_parameters(), lr=TRAIN_LR[name], foreach=foreach,
                               **TRAIN_KWARGS.get(name, {}))
        x, y = (t.cuda() for t in _classification_data())
        for _ in range(10):
            opt.zero_grad()
            _loss(model(x.to(dtype)), y).backward()
            if name == "clars":
                opt.add_grad_norms(model, _loss, x.to(dtype), y)
            opt.step()
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        spacing = _spacing(b.detach().double().cpu().numpy(), dtype)
        assert (np.abs(a.detach().double().cpu().numpy() - b.detach().double().cpu().numpy()) / spacing).max() <= 1.0
