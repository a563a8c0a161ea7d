"""CLARS per-example gradient norms: exact (vmap) against explicit loops, microbatch:B == exact, BatchNorm handling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hvd_largebatch.torch_impl import CLARS, per_example_grad_norm_sums, per_example_grad_norms


def _mlp(track_running_stats=True):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7, track_running_stats=track_running_stats), torch.nn.ReLU(),
        torch.nn.Linear(7, 3),
    ).double()


def _cnn():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6, 3)
    ).double()


def _data(batch=9, shape=(5,)):
    torch.manual_seed(2)
    return torch.randn(batch, *shape, dtype=torch.float64), torch.randint(0, 3, (batch,))


def _frozen_copy(model, x):
    """The model with every BatchNorm in eval mode holding the batch's mean and biased variance."""
    frozen = copy.deepcopy(model)
    captured = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, args[0].detach()))
        for name, m in frozen.named_modules() if isinstance(m, torch.nn.BatchNorm1d)
    ]
    with torch.no_grad():
        frozen(x)  # train mode: each layer sees the batch-normalised output of the one before
    for h in hooks:
        h.remove()
    for name, m in frozen.named_modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            h = captured[name]
            dims = [0, *range(2, h.dim())]
            m.eval()
            m.track_running_stats = True
            m.running_mean = h.mean(dims)
            m.running_var = h.var(dims, unbiased=False)
    return frozen


def _explicit_norm_means(model, x, y, groups):
    """Mean over ``groups`` (lists of example indices) of the gradient norm of each parameter, by loops."""
    frozen = _frozen_copy(model, x)
    params = list(frozen.parameters())
    totals = torch.zeros(len(params), dtype=torch.float64)
    for index in groups:
        grads = torch.autograd.grad(F.cross_entropy(frozen(x[index]), y[index]), params)
        totals += torch.stack([g.norm() for g in grads])
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, totals / len(groups)))


@pytest.mark.parametrize("build,shape", [(_mlp, (5,)), (_cnn, (1, 8)), (lambda: _mlp(False), (5,))],
                         ids=["mlp-bn", "cnn-bn", "bn-without-running-stats"])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_exact_equals_a_loop_over_examples_with_batch_statistics_frozen(build, shape, chunk_size):
    model = build()
    x, y = _data(shape=shape)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    got = per_example_grad_norms(model, F.cross_entropy, x, y, chunk_size=chunk_size)
    expected = _explicit_norm_means(model, x, y, [[i] for i in range(len(x))])
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=0, msg=name)
    # the model's running statistics and modes are untouched
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("build,shape", [(_mlp, (5,)), (_cnn, (1, 8))], ids=["mlp-bn", "cnn-bn"])
def test_microbatch_with_k_equal_to_batch_is_exact(build, shape):
    model = build()
    x, y = _data(shape=shape)
    exact = per_example_grad_norms(model, F.cross_entropy, x, y, estimator="exact", chunk_size=4)
    micro = per_example_grad_norms(model, F.cross_entropy, x, y, estimator=f"microbatch:{len(x)}")
    for name in exact:
        torch.testing.assert_close(micro[name], exact[name], rtol=1e-10, atol=0, msg=name)


def test_microbatch_k_averages_micro_batch_gradient_norms():
    model = _mlp()
    x, y = _data(batch=9)
    got = per_example_grad_norms(model, F.cross_entropy, x, y, estimator="microbatch:3")
    expected = _explicit_norm_means(model, x, y, [list(range(0, 3)), list(range(3, 6)), list(range(6, 9))])
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=0, msg=name)
    sums, count = per_example_grad_norm_sums(model, F.cross_entropy, x, y, list(model.parameters()), estimator="microbatch:3")
    assert count == 3 and sums.dtype == torch.float64


def test_exact_without_batch_norm_is_the_plain_per_example_gradient():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = _data()
    got = per_example_grad_norms(model, F.cross_entropy, x, y, params=[model[0].weight])
    norms = []
    for i in range(len(x)):
        (g,) = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [model[0].weight])
        norms.append(g.norm())
    assert list(got) == ["0.weight"]
    torch.testing.assert_close(got["0.weight"], torch.stack(norms).mean(), rtol=1e-12, atol=0)
    assert model[0].weight.grad is None  # nothing accumulated into .grad


def test_models_with_dropout_run_and_clars_trains():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt = CLARS(model.named_parameters(), lr=2.0, chunk_size=5)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.add_grad_norms(model, F.cross_entropy, x, y)
        opt.step()
        first = loss.item() if first is None else first
    assert F.cross_entropy(model.eval()(x), y).item() < first
    assert opt.skipped_steps == 0
