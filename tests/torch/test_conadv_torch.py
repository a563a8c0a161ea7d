"""ConAdv for PyTorch: staleness pinned in float64 against a NumPy reference, attack bounds and modes,
dual BatchNorm, concurrency, state round trip and bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conadv_reference import ATTACK, BATCH, CLASSES, DIM, LR, STEPS
from conadv_reference import problem as _problem
from conadv_reference import reference_attack as _reference_attack
from conadv_reference import reference_conadv as _reference_conadv
from hvd_largebatch.config import ConAdvConfig
from hvd_largebatch.torch_impl.conadv import ConAdv, lookahead, make_adversarial_examples
from hvd_largebatch.torch_impl.dual_bn import (
    DualBatchNorm1d,
    DualBatchNorm2d,
    auxiliary_bn,
    convert_from_dual_bn,
    convert_to_dual_bn,
)

torch.set_num_threads(1)


def _torch_run(W, b, batches, *, use_lookahead=True, **conadv_kwargs):
    model = nn.Linear(DIM, CLASSES).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
    conadv = ConAdv(model, random_start_prob=0.0, targeted=False, **conadv_kwargs)
    thetas = [(model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy())]
    adversarial = []
    pairs = conadv.lookahead(data) if use_lookahead else ((batch, None) for batch in data)
    for (x, y), ahead in pairs:
        opt.zero_grad()
        conadv.loss(x, y, ahead).backward()
        opt.step()
        thetas.append((model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()))
        adversarial.append(conadv.last_adversarial.numpy().copy())
    conadv.close()
    return thetas, adversarial




def _assert_trajectories_equal(got, expected):
    (thetas, adversarial), (ref_thetas, ref_adversarial) = got, expected
    for t, (x_adv, ref) in enumerate(zip(adversarial, ref_adversarial, strict=True)):
        np.testing.assert_allclose(x_adv, ref, rtol=0, atol=1e-12, err_msg=f"perturbation of step {t}")
    for t, ((W, b), (ref_W, ref_b)) in enumerate(zip(thetas, ref_thetas, strict=True)):
        np.testing.assert_allclose(W, ref_W, rtol=1e-10, atol=1e-12, err_msg=f"weights after {t} steps")
        np.testing.assert_allclose(b, ref_b, rtol=1e-10, atol=1e-12, err_msg=f"bias after {t} steps")


def _reference(tau, problem, average=False):
    W, b, batches = problem
    return _reference_conadv(
        W, b, batches, tau, ATTACK["epsilon"], ATTACK["step_size"], ATTACK["attack_iters"],
        ATTACK["adv_weight"], ATTACK["input_range"], average,
    )


@pytest.mark.parametrize("tau", [0, 1, 2])
@pytest.mark.parametrize("concurrent", [True, False])
def test_staleness_is_exact_in_float64(tau, concurrent):
    problem = _problem()
    got = _torch_run(*problem, staleness=tau, concurrent=concurrent, dual_bn=False, **ATTACK)
    _assert_trajectories_equal(got, _reference(tau, problem))


def test_average_losses_trains_on_the_weighted_mean():
    problem = _problem()
    got = _torch_run(*problem, staleness=1, dual_bn=False, average_losses=True, **ATTACK)
    _assert_trajectories_equal(got, _reference(1, problem, average=True))
    assert not np.allclose(got[0][-1][0], _reference(1, problem)[0][-1][0])


@pytest.mark.parametrize("tau", [1, 2])
def test_without_lookahead_the_perturbation_still_comes_from_stale_weights(tau):
    # No ahead batch: each perturbation is computed at its own step, from the snapshot theta_{t-tau}.
    problem = _problem()
    got = _torch_run(*problem, staleness=tau, use_lookahead=False, dual_bn=False, **ATTACK)
    _assert_trajectories_equal(got, _reference(tau, problem))


def test_staleness_is_observable_on_the_reference_problem():
    # Guards the tests above: on this problem tau = 0, 1, 2 give different perturbations and weights.
    problem = _problem()
    runs = {tau: _reference(tau, problem) for tau in (0, 1, 2)}
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        differing_steps = sum(not np.allclose(p, q) for p, q in zip(runs[a][1], runs[b][1]))
        assert differing_steps >= 3, (a, b, differing_steps)
        assert not np.allclose(runs[a][0][-1][0], runs[b][0][-1][0])


def test_tau_one_uses_the_weights_that_the_previous_step_started_from():
    # Step t's perturbation equals an attack from theta_{t-1} and (for t >= 1) not one from theta_t.
    problem = _problem(seed=3)
    thetas, adversarial = _torch_run(*problem, staleness=1, dual_bn=False, **ATTACK)
    W0, b0, batches = problem
    mismatching_fresh = 0
    for t in range(1, STEPS):
        x, y = batches[t]
        stale = _reference_attack(*thetas[t - 1], x, y, 0.3, 0.2, 2, (-1.0, 1.0))
        fresh = _reference_attack(*thetas[t], x, y, 0.3, 0.2, 2, (-1.0, 1.0))
        np.testing.assert_allclose(adversarial[t], stale, atol=1e-12)
        mismatching_fresh += not np.allclose(adversarial[t], fresh)
    assert mismatching_fresh >= 3


# ---------------------------------------------------------------------------------------------
# The attack itself
# ---------------------------------------------------------------------------------------------
def _small_cnn(dual=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12, 5)
    ).double()
    return convert_to_dual_bn(model) if dual else model


@pytest.mark.parametrize("targeted", [True, False])
def test_perturbations_stay_within_epsilon_and_the_input_range(targeted):
    model = _small_cnn()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 12, generator=gen, dtype=torch.float64) * 2 - 1
    x[:4] = 1.0  # on the boundary of the input range
    y = torch.randint(0, 5, (32,), generator=gen)
    x_adv = make_adversarial_examples(
        model, x, y, epsilon=0.25, step_size=0.15, attack_iters=4, random_start_prob=1.0,
        targeted=targeted, input_range=(-1.0, 1.0), generator=gen,
    )
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= 0.25 * (1 + 1e-12)
    assert float((x_adv - x).abs().max()) >= 0.2  # the attack does move the inputs
    assert float(x_adv.min()) >= -1.0 and float(x_adv.max()) <= 1.0


def test_random_start_is_per_example_with_the_given_probability():
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 3)).double()
    with torch.no_grad():
        model[1].weight.zero_()  # zero input gradient: the output is the random start alone
    x = torch.zeros(4000, 10, dtype=torch.float64)
    y = torch.zeros(4000, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    x_adv = make_adversarial_examples(
        model, x, y, epsilon=0.5, step_size=0.1, random_start_prob=0.8, targeted=False, input_range=None, generator=gen
    )
    started = (x_adv != 0).any(dim=1)
    assert bool(((x_adv != 0).all(dim=1) | ~started).all())  # an example starts in all coordinates or none
    assert 0.77 < float(started.double().mean()) < 0.83
    assert float(x_adv.abs().max()) <= 0.5 and float(x_adv.abs().max()) > 0.45


def test_targeted_mode_moves_toward_a_random_wrong_class_and_untargeted_away_from_the_label():
    torch.manual_seed(0)
    model = nn.Linear(DIM, 4).double()
    x = torch.rand(64, DIM, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 4, (64,))
    seed = 7
    x_adv = make_adversarial_examples(
        model, x, y, epsilon=0.01, step_size=0.01, random_start_prob=0.0, targeted=True,
        input_range=None, generator=torch.Generator().manual_seed(seed),
    )
    # The targets are drawn as documented: (y + U{1..C-1}) mod C from the generator.
    target = (y + torch.randint(1, 4, (64,), generator=torch.Generator().manual_seed(seed))) % 4
    assert bool((target != y).all())
    with torch.no_grad():
        before = F.cross_entropy(model(x), target, reduction="none")
        after = F.cross_entropy(model(x_adv), target, reduction="none")
    assert bool((after < before).all())  # every example moved toward its target class

    x_up = make_adversarial_examples(
        model, x, y, epsilon=0.01, step_size=0.01, random_start_prob=0.0, targeted=False, input_range=None
    )
    with torch.no_grad():
        assert bool((F.cross_entropy(model(x_up), y, reduction="none") > F.cross_entropy(model(x), y, reduction="none")).all())


def test_a_nonfinite_input_gradient_gives_no_step():
    class NaNGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            grad[:, 0] = float("nan")
            return grad

    class WithNaNGradient(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 2).double()

        def forward(self, v):
            return self.inner(NaNGradient.apply(v))

    x = torch.zeros(5, 3, dtype=torch.float64)
    y = torch.zeros(5, dtype=torch.long)
    x_adv = make_adversarial_examples(
        WithNaNGradient(), x, y, epsilon=0.1, step_size=0.1, random_start_prob=0.0, targeted=False, input_range=None
    )
    assert bool(torch.isfinite(x_adv).all())
    assert bool((x_adv[:, 0] == 0).all()) and bool((x_adv[:, 1:].abs() == 0.1).all())


# ---------------------------------------------------------------------------------------------
# Dual BatchNorm
# ---------------------------------------------------------------------------------------------
def test_converter_keeps_main_parameters_and_function_and_adds_an_auxiliary_copy():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12)))
    model.train()
    model(torch.randn(16, 1, 4, 4))  # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    main_weight = model[1].weight
    x = torch.randn(4, 1, 4, 4)
    model.eval()
    expected = model(x)
    converted = convert_to_dual_bn(model)
    assert converted is model and isinstance(model[1], DualBatchNorm2d) and isinstance(model[2][1], DualBatchNorm1d)
    assert model[1].weight is main_weight
    state = model.state_dict()
    for key, value in before.items():  # the original keys are the main BatchNorm, unchanged
        assert torch.equal(state[key], value)
        aux_key = key.replace("1.", "1.aux.", 1) if key.startswith("1.") else key.replace("2.1.", "2.1.aux.", 1)
        if key.startswith(("1.", "2.1.")):
            assert torch.equal(state[aux_key], value)
    model.eval()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with auxiliary_bn(model):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # aux starts as an exact copy
    plain = convert_from_dual_bn(model)
    assert type(plain[1]) is nn.BatchNorm2d and set(plain.state_dict()) == set(before)


def test_main_bn_statistics_are_untouched_by_adversarial_batches():
    torch.manual_seed(0)
    model = convert_to_dual_bn(nn.Sequential(nn.BatchNorm1d(DIM), nn.Linear(DIM, CLASSES)).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clean_bn, adv_bn = nn.BatchNorm1d(DIM).double(), nn.BatchNorm1d(DIM).double()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(BATCH, DIM, generator=gen, dtype=torch.float64) * 2 - 1, torch.randint(0, 3, (BATCH,), generator=gen)) for _ in range(6)]
    conadv = ConAdv(model, epsilon=0.3, step_size=0.3, seed=0)
    for (x, y), ahead in conadv.lookahead(data):
        opt.zero_grad()
        conadv.loss(x, y, ahead).backward()
        opt.step()
        clean_bn(x)  # what the main statistics must have seen: the clean batches only
        adv_bn(conadv.last_adversarial)
    conadv.close()
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, clean_bn.running_mean, rtol=0, atol=1e-15)
    torch.testing.assert_close(bn.running_var, clean_bn.running_var, rtol=0, atol=1e-15)
    torch.testing.assert_close(bn.aux.running_mean, adv_bn.running_mean, rtol=0, atol=1e-15)
    torch.testing.assert_close(bn.aux.running_var, adv_bn.running_var, rtol=0, atol=1e-15)
    assert int(bn.num_batches_tracked) == 6 and int(bn.aux.num_batches_tracked) == 6
    # ... and both affine sets trained, each on its own branch.
    assert not torch.equal(bn.weight, bn.aux.weight)


def test_without_dual_bn_main_statistics_see_both_batches():
    # The counterpart of the test above, showing it can detect a leak.
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(DIM), nn.Linear(DIM, CLASSES)).double()
    conadv = ConAdv(model, epsilon=0.3, step_size=0.3, dual_bn=False, seed=0)
    x, y = torch.rand(BATCH, DIM, dtype=torch.float64), torch.randint(0, 3, (BATCH,))
    conadv.loss(x, y)
    assert int(model[0].num_batches_tracked) == 2


def test_dual_bn_requires_converted_layers():
    with pytest.raises(ValueError, match=r"plain BatchNorm layers .*model = hvd_largebatch.torch_impl.convert_to_dual_bn\(model\)"):
        ConAdv(_small_cnn(dual=False))
    ConAdv(nn.Linear(3, 2))  # no BatchNorm at all: dual_bn has nothing to do
    ConAdv(_small_cnn(dual=False), dual_bn=False)


def test_evaluation_uses_main_bn_and_state_dict_keeps_both_sets():
    model = _small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(16, 1, 12, generator=gen, dtype=torch.float64) * 2 - 1, torch.randint(0, 5, (16,), generator=gen)) for _ in range(4)]
    with ConAdv(model, epsilon=0.3, step_size=0.3, seed=1) as conadv:
        for (x, y), ahead in conadv.lookahead(data):
            opt.zero_grad()
            conadv.loss(x, y, ahead).backward()
            opt.step()
    model.eval()
    x = data[0][0]
    plain = _small_cnn(dual=False)
    state = model.state_dict()
    plain.load_state_dict({k: v for k, v in state.items() if ".aux." not in k})
    plain.eval()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # eval = main BN only
    with auxiliary_bn(model):
        assert not torch.allclose(model(x), plain(x))
    restored = _small_cnn()
    restored.load_state_dict(state)
    restored.eval()
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    with auxiliary_bn(restored), auxiliary_bn(model):
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Concurrency, lookahead, state
# ---------------------------------------------------------------------------------------------
def test_attacks_run_on_a_background_thread_on_a_snapshot_never_on_the_live_model():
    calls = []
    model = nn.Linear(DIM, CLASSES).double()

    def record(module, inputs, output):
        calls.append((module is model, threading.get_ident(), inputs[0].requires_grad))

    model.register_forward_hook(record)  # copied into the snapshots with the module
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    W, b, batches = _problem()
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
    main = threading.get_ident()
    with ConAdv(model, epsilon=0.1, step_size=0.1, seed=0) as conadv:
        for (x, y), ahead in conadv.lookahead(data):
            opt.zero_grad()
            conadv.loss(x, y, ahead).backward()
            opt.step()
    live = [c for c in calls if c[0]]
    snapshot = [c for c in calls if not c[0]]
    assert len(live) == 2 * STEPS and all(thread == main for _, thread, _ in live)
    assert len(snapshot) == STEPS  # one attack per batch
    assert sum(thread != main for _, thread, _ in snapshot) == STEPS - 1  # all but step 0 ran ahead


def test_lookahead_pairs_each_batch_with_the_one_tau_steps_later():
    assert list(lookahead(range(5), 2)) == [(0, 2), (1, 3), (2, 4), (3, None), (4, None)]
    assert list(lookahead(range(3), 0)) == [(0, None), (1, None), (2, None)]
    assert list(lookahead(range(2), 4)) == [(0, None), (1, None)]
    assert list(lookahead([], 1)) == []
    moved = list(lookahead([(torch.zeros(2), torch.ones(2, dtype=torch.long))], 1, device="cpu"))
    assert moved[0][1] is None and torch.equal(moved[0][0][0], torch.zeros(2))


def test_a_batch_that_is_not_the_announced_one_is_refused():
    conadv = ConAdv(nn.Linear(DIM, CLASSES).double(), input_range=None, seed=0)
    x, y = torch.zeros(4, DIM, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    conadv.loss(x, y, ahead=(x + 1, y))
    with pytest.raises(ValueError, match="not the ahead batch"):
        conadv.loss(x, y)
    conadv.close()


def test_state_dict_round_trip_continues_exactly():
    problem = _problem(seed=5, steps=10)
    W, b, batches = problem
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]

    def build():
        model = nn.Linear(DIM, CLASSES).double()
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(W))
            model.bias.copy_(torch.from_numpy(b))
        return model, torch.optim.SGD(model.parameters(), lr=LR)

    kwargs = dict(epsilon=0.3, step_size=0.2, random_start_prob=0.5, targeted=True, seed=11)
    model, opt = build()
    pairs = list(lookahead(data, 1))
    conadv = ConAdv(model, **kwargs)
    for i, ((x, y), ahead) in enumerate(pairs):
        if i == 5:
            saved = (
                {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), conadv.state_dict()
            )
        opt.zero_grad()
        conadv.loss(x, y, ahead).backward()
        opt.step()
    conadv.close()
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    resumed = ConAdv(resumed_model, **{**kwargs, "seed": 0})
    resumed.load_state_dict(saved[2])
    for (x, y), ahead in pairs[5:]:
        resumed_opt.zero_grad()
        resumed.loss(x, y, ahead).backward()
        resumed_opt.step()
    resumed.close()
    torch.testing.assert_close(resumed_model.weight, model.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="state was saved with"):
        ConAdv(nn.Linear(DIM, CLASSES).double(), epsilon=0.2).load_state_dict(saved[2])


# ---------------------------------------------------------------------------------------------
# Bad input: every argument, a clear ValueError naming it
# ---------------------------------------------------------------------------------------------
BAD_ARGUMENTS = [
    ("epsilon", 0.0), ("epsilon", -0.1), ("epsilon", float("nan")), ("step_size", 0), ("step_size", "a"),
    ("staleness", -1), ("staleness", 1.5), ("staleness", True), ("attack_iters", 0), ("attack_iters", 2.0),
    ("random_start_prob", 1.5), ("random_start_prob", -0.1), ("targeted", 1), ("adv_weight", -1.0),
    ("dual_bn", "yes"), ("average_losses", 1), ("input_range", (1.0, -1.0)), ("input_range", (0.0,)), ("input_range", 3.0),
    ("concurrent", 1), ("seed", -1), ("seed", 1.5), ("loss_fn", "cross_entropy"),
]


@pytest.mark.parametrize("argument,value", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(argument, value):
    with pytest.raises(ValueError, match=argument):
        ConAdv(nn.Linear(3, 2), **{argument: value})


def test_defaults_come_from_the_core_config():
    conadv = ConAdv(nn.Linear(3, 2))
    assert conadv.config == ConAdvConfig()


def test_bad_batches_raise_value_error():
    model = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match="model"):
        ConAdv(model.state_dict())
    conadv = ConAdv(model, input_range=None)
    x, y = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="x must be a floating-point"):
        conadv.loss(torch.zeros(4, 3, dtype=torch.long), y)
    with pytest.raises(ValueError, match="same batch size"):
        conadv.loss(x, y[:3])
    with pytest.raises(ValueError, match="targeted=True needs y"):
        conadv.loss(x, y.double())
    with pytest.raises(ValueError, match="ahead must be None or a batch"):
        conadv.loss(x, y, ahead=x)
    with pytest.raises(ValueError, match="ahead must be None when staleness=0"):
        ConAdv(model, staleness=0, input_range=None).loss(x, y, ahead=(x, y))
    with pytest.raises(ValueError, match="input_range"):
        ConAdv(model).loss(x + 3, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ConAdv(nn.Linear(3, 1).double(), input_range=None).loss(x, y)
