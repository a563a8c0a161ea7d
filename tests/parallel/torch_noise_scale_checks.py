"""Gradient-noise-scale checks of hvd_largebatch.torch_impl, run inside torch_worker.py's launch (float64).

Every rank trains on its slice of a fixed global batch known to all ranks, so
each rank can also compute the per-example gradients of the whole batch and
the closed-form estimates the monitor must reproduce.
"""

from __future__ import annotations

import hashlib
from typing import Any

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from hvd_largebatch import noise_scale
from hvd_largebatch.torch_impl import SGD, DistributedOptimizer, NoiseScaleMonitor

PER_RANK = 4
STEPS = 5


def model(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(500 + step)
    x = torch.randn(size * PER_RANK, 5, generator=generator)
    return x, torch.randint(0, 3, (size * PER_RANK,), generator=generator)


def per_example_gradients(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), list(net.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def weights_digest(net: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for p in net.parameters():
        digest.update(p.detach().numpy().tobytes())
    return digest.hexdigest()


def train(horovod_wrapper: bool, monitored: bool, passes: int, interval: int = 1) -> dict[str, Any]:
    """STEPS updates of SGD on this rank's slice; the monitor's numbers after each step."""
    rank, size = hvd.rank(), hvd.size()
    net = model()
    base = torch.optim.SGD(net.parameters(), lr=0.3) if horovod_wrapper else SGD(net.named_parameters(), lr=0.3)
    if horovod_wrapper:
        opt = hvd.DistributedOptimizer(base, named_parameters=net.named_parameters(), backward_passes_per_step=passes)
    else:
        opt = DistributedOptimizer(base, backward_passes_per_step=passes)
    monitor = NoiseScaleMonitor(opt, batch_size=PER_RANK // passes, interval=interval, ema_decay=0.5) if monitored else None
    out: dict[str, Any] = {"local": [], "small": [], "big": [], "b_simple": [], "raw": [], "exact": []}
    for step in range(STEPS):
        x, y = batch(step, size)
        exact = noise_scale.exact_estimates_from_per_example_gradients(
            per_example_gradients(net, x, y).numpy(), PER_RANK
        )
        xs, ys = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        opt.zero_grad()
        for xm, ym in zip(xs.chunk(passes), ys.chunk(passes)):
            F.cross_entropy(net(xm), ym).backward()  # each pass's loss is the mean over its examples
        opt.step()
        if monitor is not None and step % interval == 0:
            out["local"].append(monitor.last_local_sq_norms)
            out["small"].append(monitor.last_small_sq_norms)
            out["big"].append(monitor.last_big_sq_norms)
            out["raw"].append([monitor.raw_g2, monitor.raw_s])
            out["exact"].append(list(exact))
        out["b_simple"].append(None if monitor is None else monitor.b_simple)
    out["digest"] = weights_digest(net)
    if monitor is not None:
        out.update(g2=monitor.g2, s=monitor.s, updates=monitor.estimator.updates, batches=[
            monitor.estimator.small_batch, monitor.estimator.big_batch])
        out["advice"] = monitor.advice()
        monitor.remove()
    return out


def run_checks() -> dict[str, Any]:
    """The results under the key ``noise_scale/...`` (compared by test_torch_parallel.py)."""
    results: dict[str, Any] = {}
    for wrapper, passes in (("package", 1), ("horovod", 2)):
        on = train(wrapper == "horovod", monitored=True, passes=passes)
        off = train(wrapper == "horovod", monitored=False, passes=passes)
        results[f"noise_scale/{wrapper}/passes{passes}"] = {**on, "digest_off": off["digest"]}
    every_other = train(False, monitored=True, passes=1, interval=2)
    results["noise_scale/interval2"] = {"updates": every_other["updates"], "measured": len(every_other["small"])}
    return results
