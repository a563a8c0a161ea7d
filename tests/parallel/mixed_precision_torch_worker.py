"""Worker for tests/parallel/test_mixed_precision_parallel.py: torch mixed precision under horovodrun, one launch.

Every rank runs every check and writes numbers with ``write_results``:

* ``scaler/<name>``: an fp32 model trained with ``torch.amp.GradScaler`` in
  Horovod's order (``synchronize``, ``unscale_``, ``skip_synchronize`` +
  ``scaler.step``); at step ``POISON_STEP`` only rank 1's loss is Inf. Both
  ranks must skip that step (the Inf is in the average), keep the same
  scale, and end equal to the run without a scaler that leaves the step out;
* ``autocast/<name>``: the same loop under ``torch.autocast`` (bfloat16 on
  CPU) without a poisoned step, against the fp32 run (bfloat16 tolerance);
* ``compression/<name>``: ``compression=hvd.Compression.fp16`` against the
  uncompressed run;
* ``half/<name>``: float16 parameters, every rank identical and finite.

Usage: horovodrun -np 2 -H localhost:2 --gloo python mixed_precision_torch_worker.py
"""

from __future__ import annotations

import hashlib
import math

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from hvd_largebatch.torch_impl import DistributedOptimizer, broadcast_state, create_optimizer
from launcher import write_results

STEPS = 6
POISON_STEP = 3
LOCAL_BATCH = 16
OPTIMIZERS = {
    "sgd": dict(lr=0.1, weight_decay=1e-3, nesterov=True),
    "lars": dict(lr=2.0, weight_decay=1e-3, trust_coefficient=0.02),
    "larc": dict(lr=0.1, weight_decay=1e-3, trust_coefficient=0.02),
    "clars": dict(lr=2.0, weight_decay=1e-3, trust_coefficient=0.02),
    "lamb": dict(lr=0.01),
}
LR_FACTORS = [0.5, 0.7, 0.9, 1.0, 0.8, 0.6]  # a changing LR exercises momentum correction


def mlp(seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


def local_batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + hvd.rank())
    x = torch.randn(LOCAL_BATCH, 8, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x.to(dtype), y


def digest(model: torch.nn.Module, optimizer) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().numpy().tobytes())
    for state in optimizer.state.values():
        for key in sorted(state):
            value = state[key]
            h.update(value.detach().float().numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    return h.hexdigest()


def relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p.double() - q.double()).norm() / q.double().norm().clamp_min(1e-300))
        for p, q in zip(a.parameters(), b.parameters())
    )


def nonfinite_count(model: torch.nn.Module, optimizer) -> int:
    tensors = list(model.parameters()) + [
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    ]
    return int(sum((~torch.isfinite(t.float())).sum() for t in tensors))


def train(name: str, *, scaler: bool, poison: bool = False, omit: int | None = None, autocast: bool = False,
          compression=None, dtype: torch.dtype = torch.float32) -> dict:
    model = mlp(seed=7 + hvd.rank(), dtype=dtype)  # rank-dependent start: broadcast_state must fix it
    kwargs = dict(OPTIMIZERS[name])
    base_lr = kwargs.pop("lr")
    optimizer = DistributedOptimizer(
        create_optimizer(name, model.named_parameters(), lr=base_lr, **kwargs), compression=compression
    )
    broadcast_state(model, optimizer)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaler else None
    scales = []
    for step in range(STEPS):
        if step == omit:
            continue
        for group in optimizer.param_groups:
            group["lr"] = base_lr * LR_FACTORS[step]
        x, y = local_batch(step, dtype)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x), y)
        if poison and step == POISON_STEP and hvd.rank() == 1:
            loss = loss * math.inf  # only rank 1's batch overflows
        if grad_scaler is None:
            loss.backward()
            if name == "clars":
                optimizer.add_grad_norms(model, loss_fn, x, y)
            optimizer.step()
            continue
        grad_scaler.scale(loss).backward()
        if name == "clars":
            optimizer.add_grad_norms(model, loss_fn, x, y)
        optimizer.synchronize()  # the averaged gradients: every rank finds the same Inf
        grad_scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            grad_scaler.step(optimizer)
        grad_scaler.update()
        scales.append(grad_scaler.get_scale())
    return {"model": model, "optimizer": optimizer, "scales": scales}


def scaler_checks(name: str) -> dict:
    scaled = train(name, scaler=True, poison=True)
    omitted = train(name, scaler=False, omit=POISON_STEP)
    fp32 = train(name, scaler=False)
    return {
        "digest": digest(scaled["model"], scaled["optimizer"]),
        "scales": scaled["scales"],
        "vs_step_left_out": relative_difference(scaled["model"], omitted["model"]),
        "moved_by_poisoned_step": relative_difference(fp32["model"], omitted["model"]),
        "nonfinite": nonfinite_count(scaled["model"], scaled["optimizer"]),
        "optimizer_skips": scaled["optimizer"].skipped_steps,
    }


def autocast_checks(name: str) -> dict:
    mixed = train(name, scaler=True, autocast=True)
    fp32 = train(name, scaler=False)
    start = mlp(seed=7)
    return {
        "digest": digest(mixed["model"], mixed["optimizer"]),
        "vs_fp32": relative_difference(mixed["model"], fp32["model"]),
        "fp32_moved": relative_difference(fp32["model"], start),
        "nonfinite": nonfinite_count(mixed["model"], mixed["optimizer"]),
    }


def compression_checks(name: str) -> dict:
    compressed = train(name, scaler=False, compression=hvd.Compression.fp16)
    plain = train(name, scaler=False)
    return {
        "digest": digest(compressed["model"], compressed["optimizer"]),
        "vs_uncompressed": relative_difference(compressed["model"], plain["model"]),
        "moved": relative_difference(plain["model"], mlp(seed=7)),
        "nonfinite": nonfinite_count(compressed["model"], compressed["optimizer"]),
    }


def half_checks(name: str) -> dict:
    run = train(name, scaler=False, dtype=torch.float16)
    state_dtypes = sorted({
        str(v.dtype) for state in run["optimizer"].state.values() for v in state.values() if isinstance(v, torch.Tensor)
    })
    return {
        "digest": digest(run["model"], run["optimizer"]),
        "moved": relative_difference(run["model"], mlp(seed=7, dtype=torch.float16)),
        "nonfinite": nonfinite_count(run["model"], run["optimizer"]),
        "state_dtypes": state_dtypes,
        "skips": run["optimizer"].skipped_steps,
    }


def main() -> None:
    hvd.init()
    torch.set_num_threads(1)
    results = {"rank": hvd.rank(), "size": hvd.size()}
    for name in OPTIMIZERS:
        results[f"scaler/{name}"] = scaler_checks(name)
        results[f"autocast/{name}"] = autocast_checks(name)
        results[f"compression/{name}"] = compression_checks(name)
        results[f"half/{name}"] = half_checks(name)
    write_results(hvd.rank(), results)


if __name__ == "__main__":
    main()
