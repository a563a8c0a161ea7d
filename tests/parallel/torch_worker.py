"""Worker for tests/parallel/test_torch_parallel.py: many checks of hvd_largebatch.torch_impl in one horovodrun launch.

Every rank runs every check and writes its results with ``write_results``.
The data of every check is a fixed global batch, known to all ranks; rank r
trains on its slice, and each rank also trains a single-process reference on
the whole batch, so the test can compare "k ranks on their slices" with "one
process on the concatenated batch" without another launch. Everything runs
in float64 so that only summation order separates the two.

Usage: horovodrun -np 2 -H localhost:2 --gloo python torch_worker.py CHECKPOINT_DIR
"""

from __future__ import annotations

import hashlib
import math
import sys
from typing import Any

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from hvd_largebatch import schedules
from hvd_largebatch.torch_impl import (
    CLARS,
    LARS,
    DistributedOptimizer,
    GradualWarmupScheduler,
    broadcast_state,
    create_optimizer,
    load_checkpoint,
    per_example_grad_norms,
    save_checkpoint,
)
from launcher import write_results
from torch_noise_scale_checks import run_checks as noise_scale_checks

STEPS = 6
LOCAL_BATCH = 8
OPTIMIZERS = {
    "sgd": dict(lr=0.05, weight_decay=1e-3, nesterov=True),
    "lars": dict(lr=2.0, weight_decay=1e-3),
    "larc": dict(lr=0.05, weight_decay=1e-3, trust_coefficient=0.02),
    "clars": dict(lr=2.0, weight_decay=1e-3),
    "lamb": dict(lr=0.01),
}


# ----------------------------------------------------------------------
# models, data, digests
# ----------------------------------------------------------------------
def mlp(seed: int) -> torch.nn.Module:
    """No BatchNorm: k ranks on slices must equal one process on the whole batch."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)
    )


def cnn_with_bn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8, 3)
    )


def global_batch(step: int, size: int, per_rank: int, shape=(6,)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size * per_rank, *shape, generator=generator)
    y = torch.randint(0, 3, (size * per_rank,), generator=generator)
    return x, y


def local_slice(x: torch.Tensor, y: torch.Tensor, rank: int, per_rank: int):
    return x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(str((tuple(value.shape), value.dtype)).encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _feed(digest, item)
    else:
        digest.update(repr(value).encode())


def digest_of(model: torch.nn.Module, optimizer) -> str:
    """sha256 of every weight, buffer and optimizer-state value (tensors by their bytes)."""
    digest = hashlib.sha256()
    _feed(digest, model.state_dict())
    if optimizer is not None:
        _feed(digest, optimizer.state_dict())
    return digest.hexdigest()


def parameters_and_state_digest(model: torch.nn.Module, optimizer) -> str:
    """Like :func:`digest_of` without the buffers (BatchNorm running statistics are per rank)."""
    digest = hashlib.sha256()
    _feed(digest, dict(model.named_parameters()))
    _feed(digest, optimizer.state_dict())
    return digest.hexdigest()


def digest_without_skip_count(model: torch.nn.Module, optimizer) -> str:
    digest = hashlib.sha256()
    _feed(digest, model.state_dict())
    _feed(digest, {k: v for k, v in optimizer.state_dict().items() if k != "skipped_steps"})
    return digest.hexdigest()


def max_relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    worst = 0.0
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        if p.is_floating_point():
            scale = max(q.abs().max().item(), 1e-300)
            worst = max(worst, (p - q).abs().max().item() / scale)
    return worst


def train_step(model, opt, x, y, passes: int = 1, clars: bool = False) -> None:
    """One optimizer update over ``passes`` backward passes (micro-batches of the given batch)."""
    opt.zero_grad()
    for xs, ys in zip(x.chunk(passes), y.chunk(passes)):
        (F.cross_entropy(model(xs), ys) / passes).backward()
        if clars:
            opt.add_grad_norms(model, F.cross_entropy, xs, ys)
    opt.step()


# ----------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------
def check_average_equals_concatenated_batch(name: str, passes: int) -> dict[str, Any]:
    """k ranks (own init, broadcast from rank 0) vs one process on the whole batch, same init as rank 0."""
    rank, size = hvd.rank(), hvd.size()
    per_rank = LOCAL_BATCH * passes
    model = mlp(seed=rank)  # different initial weights per rank: broadcast_state must fix that
    opt = create_optimizer(name, model.named_parameters(), **OPTIMIZERS[name])
    opt = DistributedOptimizer(opt, backward_passes_per_step=passes)
    peak = OPTIMIZERS[name]["lr"]  # CLARS runs without warmup (ALGORITHMS.md)
    schedule = None if name == "clars" else schedules.Schedule(
        peak=peak, total_steps=STEPS, warmup="gradual", warmup_steps=3, warmup_start=peak / 4
    )
    sched = GradualWarmupScheduler(opt, schedule) if schedule is not None else None
    broadcast_state(model, opt, root_rank=0)
    single = mlp(seed=0)
    single_opt = create_optimizer(name, single.named_parameters(), **OPTIMIZERS[name])
    single_sched = GradualWarmupScheduler(single_opt, schedule) if schedule is not None else None
    for step in range(STEPS):
        x, y = global_batch(step, size, per_rank)
        train_step(model, opt, *local_slice(x, y, rank, per_rank), passes=passes, clars=name == "clars")
        # the reference: one process, one forward/backward over the concatenated global batch
        single_opt.zero_grad()
        F.cross_entropy(single(x), y).backward()
        if name == "clars":
            single_opt.add_grad_norms(single, F.cross_entropy, x, y)
        single_opt.step()
        for s in (sched, single_sched):
            if s is not None:
                s.step()
    return {
        "digest": digest_of(model, opt),
        "vs_single_process": max_relative_difference(model, single),
        "moved": max(float((p - q).abs().max()) for p, q in zip(model.parameters(), mlp(seed=0).parameters())),
        "lr": opt.param_groups[0]["lr"],
        "single_lr": single_opt.param_groups[0]["lr"],
        "skipped": opt.skipped_steps,
    }


def check_bn_model_stays_identical() -> dict[str, Any]:
    """A BatchNorm CNN (running stats differ per rank) trained with LARS: weights and state identical."""
    rank, size = hvd.rank(), hvd.size()
    model = cnn_with_bn(seed=10 + rank)
    opt = DistributedOptimizer(LARS(model.named_parameters(), lr=1.0, weight_decay=5e-4, nesterov=True))
    broadcast_state(model, opt)
    for step in range(STEPS):
        x, y = global_batch(step, size, LOCAL_BATCH, shape=(1, 10))
        train_step(model, opt, *local_slice(x, y, rank, LOCAL_BATCH))
    return {
        "params_and_state_digest": parameters_and_state_digest(model, opt),
        "buffers_digest": hashlib.sha256(b"".join(b.numpy().tobytes() for b in model.buffers())).hexdigest(),
    }


def check_clars_exact_equals_microbatch() -> dict[str, Any]:
    rank, size = hvd.rank(), hvd.size()
    model = cnn_with_bn(seed=3)
    x, y = global_batch(0, size, LOCAL_BATCH, shape=(1, 10))
    xr, yr = local_slice(x, y, rank, LOCAL_BATCH)
    exact = per_example_grad_norms(model, F.cross_entropy, xr, yr, estimator="exact", chunk_size=3)
    micro = per_example_grad_norms(model, F.cross_entropy, xr, yr, estimator=f"microbatch:{LOCAL_BATCH}")
    local = per_example_grad_norms(model, F.cross_entropy, xr, yr, average_across_workers=False)
    worst = max(abs(exact[n].item() - micro[n].item()) / exact[n].item() for n in exact)
    return {
        "clars_exact": {n: v.item() for n, v in exact.items()},
        "clars_local": {n: v.item() for n, v in local.items()},
        "clars_exact_vs_microbatch": worst,
    }


def check_distributed_optimizer_keeps_settings() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    named = list(model.named_parameters())
    opt = CLARS(
        [{"params": named[:3], "lr": 0.7}, {"params": named[3:], "weight_decay": 0.0, "trust_coefficient": 0.05}],
        lr=0.3, weight_decay=1e-2, trust_coefficient=0.01, eps=1e-6, clip=True, estimator="microbatch:2",
        exclude_from_weight_decay=[r"^2\.weight$"], exclude_from_layer_adaptation=lambda n, s: n == "0.weight",
    )
    expected_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    expected_switches = opt.tensor_switches()
    ours = DistributedOptimizer(opt, backward_passes_per_step=2)
    # Horovod's own wrapper rebuilds the class from param_groups alone, without our constructor arguments
    source = CLARS(named, lr=0.3, exclude_from_layer_adaptation=lambda n, s: n == "0.weight")
    source_switches = source.tensor_switches()
    theirs = hvd.DistributedOptimizer(source, named_parameters=named)
    return {
        "groups_kept": [{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups] == expected_groups,
        "switches_kept": ours.tensor_switches() == expected_switches,
        "is_clars": isinstance(ours, CLARS) and isinstance(theirs, CLARS),
        # a user predicate replaces the default rule: only 0.weight is excluded from adaptation
        "horovod_keeps_adapt_mask": theirs.tensor_switches() == source_switches
        and [r["adapt"] for r in source_switches] == [False, True, True, True, True, True],
        "horovod_backward_passes": ours.backward_passes_per_step,
    }


def check_broadcast_state_exact(root_rank: int, root_fresh: bool) -> dict[str, Any]:
    """Ranks hold different weights and optimizer states; afterwards all hold the root's, untouched."""
    rank, size = hvd.rank(), hvd.size()
    model = cnn_with_bn(seed=20 + rank)
    opt = LARS(model.named_parameters(), lr=0.5 + rank, weight_decay=1e-3 * (rank + 1))
    steps = 0 if (rank == root_rank and root_fresh) else 2 + rank
    for step in range(steps):  # local, unsynchronised training: rank-specific state
        x, y = global_batch(50 + step + 10 * rank, 1, LOCAL_BATCH, shape=(1, 10))
        train_step(model, opt, x, y)
    opt.skipped_steps = rank
    before = digest_of(model, opt)
    root_digest = hvd.broadcast_object(before if rank == root_rank else None, root_rank=root_rank, name="root.digest")
    broadcast_state(model, opt, root_rank=root_rank)
    after = digest_of(model, opt)
    # the states must behave the same too: one more synchronised step keeps them identical
    x, y = global_batch(99, size, LOCAL_BATCH, shape=(1, 10))
    wrapped = DistributedOptimizer(opt)
    train_step(model, wrapped, *local_slice(x, y, rank, LOCAL_BATCH))
    # (BatchNorm running statistics then differ per rank: compare parameters and optimizer state)
    return {
        "after_equals_root_before": after == root_digest,
        "root_unchanged": (after == before) if rank == root_rank else None,
        "state_entries": len(wrapped.state),
        "after_step_digest": parameters_and_state_digest(model, wrapped),
        "skipped_steps": wrapped.skipped_steps,
    }


def check_nonfinite_skipped_on_all_ranks() -> dict[str, Any]:
    rank, size = hvd.rank(), hvd.size()
    model = mlp(seed=0)
    opt = DistributedOptimizer(LARS(model.named_parameters(), lr=1.0))
    x, y = global_batch(0, size, LOCAL_BATCH)
    xr, yr = local_slice(x, y, rank, LOCAL_BATCH)
    train_step(model, opt, xr, yr)
    before = digest_without_skip_count(model, opt)
    if rank == size - 1:
        xr = xr.clone()
        xr[0, 0] = math.nan  # only the last rank sees a NaN; after averaging every rank does
    train_step(model, opt, xr, yr)
    return {
        "nonfinite_unchanged": digest_without_skip_count(model, opt) == before,
        "nonfinite_skipped": opt.skipped_steps,
        "nonfinite_weights_finite": all(torch.isfinite(p).all().item() for p in model.parameters()),
    }


def check_checkpoint_resume(directory: str) -> dict[str, Any]:
    rank, size = hvd.rank(), hvd.size()
    path = f"{directory}/torch_ckpt.pt"
    schedule = schedules.Schedule(peak=1.0, total_steps=12, warmup="gradual", warmup_steps=6, warmup_start=0.25,
                                  decay="poly")

    def build(seed):
        model = mlp(seed)
        opt = DistributedOptimizer(LARS(model.named_parameters(), lr=1.0, weight_decay=1e-3))
        return model, opt, GradualWarmupScheduler(opt, schedule)

    def run(model, opt, sched, start, count):
        for step in range(start, start + count):
            x, y = global_batch(200 + step, size, LOCAL_BATCH)
            train_step(model, opt, *local_slice(x, y, rank, LOCAL_BATCH))
            sched.step()

    model, opt, sched = build(seed=0)
    broadcast_state(model, opt)
    run(model, opt, sched, 0, 4)
    wrote = save_checkpoint(path, model, opt, sched, step=4, extra={"epoch": 2})
    run(model, opt, sched, 4, 4)
    uninterrupted = digest_of(model, opt)
    hvd.allreduce(torch.zeros(1), name="checkpoint.barrier")  # the file exists before anyone reads it
    resumed, resumed_opt, resumed_sched = build(seed=100 + rank)
    info = load_checkpoint(path, resumed, resumed_opt, resumed_sched)
    run(resumed, resumed_opt, resumed_sched, info["step"], 4)
    return {
        "checkpoint_wrote": wrote,
        "checkpoint_info": info,
        "checkpoint_resume_exact": digest_of(resumed, resumed_opt) == uninterrupted,
        "checkpoint_lr": [resumed_opt.param_groups[0]["lr"], opt.param_groups[0]["lr"]],
    }


def main() -> None:
    hvd.init()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    checkpoint_dir = sys.argv[1]
    results: dict[str, Any] = {"rank": hvd.rank(), "size": hvd.size()}
    for name in OPTIMIZERS:
        results[f"average/{name}"] = check_average_equals_concatenated_batch(name, passes=1)
    for name in ("lars", "clars", "lamb"):
        results[f"accumulate2/{name}"] = check_average_equals_concatenated_batch(name, passes=2)
    results["bn_model"] = check_bn_model_stays_identical()
    results.update(check_clars_exact_equals_microbatch())
    results["settings"] = check_distributed_optimizer_keeps_settings()
    for root_rank in range(hvd.size()):
        for root_fresh in (False, True):
            results[f"broadcast/root{root_rank}/fresh{int(root_fresh)}"] = check_broadcast_state_exact(root_rank, root_fresh)
    results.update(check_nonfinite_skipped_on_all_ranks())
    results.update(check_checkpoint_resume(checkpoint_dir))
    results.update(noise_scale_checks())
    write_results(hvd.rank(), results)


if __name__ == "__main__":
    main()
