"""NoiseScaleMonitor on one rank (micro-batches are the small batches): exact, averaged as the core, harmless, validated.

The two-rank behaviour (local norms before the allreduce, identical ranks) is
tested under horovodrun in tests/parallel/test_torch_parallel.py.
"""

from __future__ import annotations

import math

import horovod.torch as hvd
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hvd_largebatch import noise_scale
from hvd_largebatch.torch_impl import SGD, DistributedOptimizer, NoiseScaleMonitor


@pytest.fixture(scope="module", autouse=True)
def horovod_one_rank():
    hvd.init()
    assert hvd.size() == 1
    yield


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def data(step: int, n: int = 8):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def per_example_gradients(net, x, y) -> np.ndarray:
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), list(net.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    return np.stack(rows)


def step(net, opt, x, y, passes: int) -> None:
    opt.zero_grad()
    for xm, ym in zip(x.chunk(passes), y.chunk(passes)):
        F.cross_entropy(net(xm), ym).backward()
    opt.step()


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
@pytest.mark.parametrize("wrapper", ["package", "horovod"])
def test_estimates_equal_the_closed_form_of_the_per_example_gradients(float64, micro_batch, wrapper):
    net = mlp()
    passes = 8 // micro_batch
    if wrapper == "package":
        opt = DistributedOptimizer(SGD(net.named_parameters(), lr=0.5), backward_passes_per_step=passes)
    else:
        opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.5), backward_passes_per_step=passes,
                                       named_parameters=net.named_parameters())
    monitor = NoiseScaleMonitor(opt, batch_size=micro_batch, ema_decay=0.0, per_tensor=True)
    assert (monitor.estimator.small_batch, monitor.estimator.big_batch) == (micro_batch, 8)
    sizes = [p.numel() for p in net.parameters()]
    for t in range(3):
        x, y = data(t)
        grads = per_example_gradients(net, x, y)
        exact_g2, exact_s = noise_scale.exact_estimates_from_per_example_gradients(grads, micro_batch)
        step(net, opt, x, y, passes)
        assert monitor.raw_g2 == pytest.approx(exact_g2, rel=1e-10)
        assert monitor.raw_s == pytest.approx(exact_s, rel=1e-10)
        # per tensor: the same closed form on each parameter's columns (decay 0: the last estimates)
        columns = np.split(grads, np.cumsum(sizes)[:-1], axis=1)
        for values, cols in zip(monitor.per_tensor_values().values(), columns):
            g2, s = noise_scale.exact_estimates_from_per_example_gradients(cols, micro_batch)
            assert values["g2"] == pytest.approx(g2, rel=1e-10, abs=1e-14)
            assert values["s"] == pytest.approx(s, rel=1e-10, abs=1e-14)
    assert list(monitor.per_tensor_values()) == [n for n, _ in net.named_parameters()]


def test_ema_and_ratio_are_the_core_estimator_fed_the_measured_norms(float64):
    net = mlp(1)
    opt = DistributedOptimizer(SGD(net.named_parameters(), lr=0.3), backward_passes_per_step=4)
    monitor = NoiseScaleMonitor(opt, batch_size=2, ema_decay=0.9)
    oracle = noise_scale.NoiseScaleEstimator(2, 8, ema_decay=0.9)
    for t in range(6):
        x, y = data(t)
        step(net, opt, x, y, 4)
        oracle.update(monitor.last_small_sq_norms, monitor.last_big_sq_norms, t)
        assert monitor.g2 == oracle.g2 and monitor.s == oracle.s
        assert monitor.b_simple == oracle.b_simple or (math.isnan(monitor.b_simple) and math.isnan(oracle.b_simple))
    assert monitor.estimator.updates == 6 and monitor.global_batch == 8
    assert "B_simple" in monitor.advice() and "global batch 8" in monitor.advice()


def test_weights_are_bit_identical_with_and_without_the_monitor():
    final = []
    for monitored in (True, False):
        net = mlp(2)
        opt = DistributedOptimizer(SGD(net.named_parameters(), lr=0.3, momentum=0.9), backward_passes_per_step=2)
        monitor = NoiseScaleMonitor(opt, batch_size=4) if monitored else None
        for t in range(5):
            step(net, opt, *data(t), 2)
        final.append([p.detach().clone() for p in net.parameters()])
        if monitor is not None:
            assert monitor.estimator.updates == 5
    assert all(torch.equal(a, b) for a, b in zip(*final))


def test_interval_state_dict_and_remove():
    net = mlp(3)
    opt = DistributedOptimizer(SGD(net.named_parameters(), lr=0.1), backward_passes_per_step=2)
    monitor = NoiseScaleMonitor(opt, batch_size=4, interval=3)
    for t in range(7):
        step(net, opt, *data(t), 2)
    assert monitor.estimator.updates == 3 and monitor.estimator.step == 6  # steps 0, 3, 6
    state = monitor.state_dict()
    monitor.remove()
    assert "synchronize" not in opt.__dict__
    resumed = NoiseScaleMonitor(opt, batch_size=4, interval=3)
    resumed.load_state_dict(state)
    for t in range(7, 10):
        step(net, opt, *data(t), 2)
    assert resumed.estimator.updates == 4 and resumed.estimator.step == 9
    resumed.remove()


def test_running_estimate_converges_to_the_known_noise_scale_of_linear_regression():
    # Per-example gradient of 0.5*(x.w - y)^2 at w = w* + delta with x ~ N(0, I_d), label noise N(0, 1):
    # G = delta, Sigma = (|delta|^2 + 1) I + delta delta^T, so B_simple = (d*2 + 1)/1 = 21 for d = 10, |delta| = 1.
    d = 10
    net = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0] = 1.0  # w* = 0
    opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), backward_passes_per_step=4)
    monitor = NoiseScaleMonitor(opt, batch_size=8, ema_decay=0.995)
    generator = torch.Generator().manual_seed(5)
    for _ in range(800):
        opt.zero_grad()
        for _ in range(4):
            x = torch.randn(8, d, generator=generator)
            y = torch.randn(8, generator=generator)  # labels of w* = 0 plus unit noise
            (0.5 * (net(x).squeeze(1) - y).square()).mean().backward()
        opt.step()
    assert monitor.b_simple == pytest.approx(21.0, rel=0.10)


BAD = [
    ("interval zero", dict(interval=0), "interval"),
    ("interval negative", dict(interval=-1), "interval"),
    ("decay one", dict(ema_decay=1.0), "ema_decay"),
    ("decay negative", dict(ema_decay=-0.5), "ema_decay"),
    ("batch size zero", dict(batch_size=0), "batch_size"),
    ("per tensor not bool", dict(per_tensor="yes"), "per_tensor"),
    ("one rank without micro-batches", dict(passes=1), "backward_passes_per_step"),
    ("not a distributed optimizer", dict(plain=True), "optimizer"),
]


@pytest.mark.parametrize("kwargs, argument", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_names_the_argument(kwargs, argument):
    kwargs = dict(kwargs)
    net = mlp()
    base = SGD(net.named_parameters(), lr=0.1)
    passes = kwargs.pop("passes", 2)
    opt = base if kwargs.pop("plain", False) else DistributedOptimizer(base, backward_passes_per_step=passes)
    kwargs.setdefault("batch_size", 4)
    with pytest.raises(ValueError, match=argument):
        NoiseScaleMonitor(opt, **kwargs)
    assert "synchronize" not in opt.__dict__  # nothing attached


def test_without_horovod_initialised_says_so(monkeypatch):
    net = mlp()
    opt = DistributedOptimizer(SGD(net.named_parameters(), lr=0.1), backward_passes_per_step=2)
    monkeypatch.setattr(hvd, "is_initialized", lambda: False)  # as in a process that never called hvd.init()
    with pytest.raises(ValueError, match=r"Horovod initialised: call horovod.torch.init\(\)"):
        NoiseScaleMonitor(opt, batch_size=4)
