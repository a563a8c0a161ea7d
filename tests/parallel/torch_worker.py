"""Worker for tests/parallel/test_torch_parallel.py: many checks of hvd_largebatch.torch_impl in one horovodrun launch.

Every rank runs every check and writes numbers with ``write_results``:
checksums, maximum absolute differences (to rank 0's values, to the root's,
to a single process) and per-rank values, never a verdict, so that the test
compares them and a failure shows what differed.
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
    average_batchnorm_statistics,
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
# models, data, checksums
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


def _numbers(value: Any) -> list[torch.Tensor]:
    """Every number in ``value`` (tensors, nested dicts and lists, scalars) as flat float64 tensors, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value.detach().reshape(-1).to(torch.float64)]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _numbers(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _numbers(item)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [torch.tensor([float(value)], dtype=torch.float64)]
    return []


def flat_values(model: torch.nn.Module, optimizer=None, *, buffers: bool = True, skip_count: bool = True) -> torch.Tensor:
    """Every weight (and buffer) and every optimizer-state number in one float64 vector."""
    parts = _numbers(model.state_dict() if buffers else dict(model.named_parameters()))
    if optimizer is not None:
        state = optimizer.state_dict()
        if not skip_count:
            state = {k: v for k, v in state.items() if k != "skipped_steps"}
        parts += _numbers(state)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def checksum(values: torch.Tensor) -> list[float]:
    """``[count, sum, sum of squares]`` of a vector: equal vectors give equal checksums, and a failure shows them."""
    return [float(values.numel()), float(values.sum()), float((values * values).sum())]


def digest_of(model: torch.nn.Module, optimizer=None) -> str:
    """sha256 of every weight, buffer and optimizer-state number (equal on two ranks only if bit-identical)."""
    return hashlib.sha256(flat_values(model, optimizer).numpy().tobytes()).hexdigest()


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max()) if a.numel() else 0.0


def max_abs_vs_rank0(values: torch.Tensor, name: str) -> float:
    """max |values - rank 0's values| (rank 0's vector is broadcast; every rank's has the same length)."""
    return max_abs_difference(values, hvd.broadcast(values, root_rank=0, name=name))


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
def check_average_equals_concatenated_batch(name: str, passes: int, **path: Any) -> dict[str, Any]:
    """k ranks (own init, broadcast from rank 0) vs one process on the whole batch, same init as rank 0.

    ``path``: update-path switches (``fused="numba"``) given to both.
    """
    rank, size = hvd.rank(), hvd.size()
    per_rank = LOCAL_BATCH * passes
    model = mlp(seed=rank)  # different initial weights per rank: broadcast_state must fix that
    opt = create_optimizer(name, model.named_parameters(), **OPTIMIZERS[name], **path)
    opt = DistributedOptimizer(opt, backward_passes_per_step=passes)
    peak = OPTIMIZERS[name]["lr"]  # CLARS runs without warmup (ALGORITHMS.md)
    schedule = None if name == "clars" else schedules.Schedule(
        peak=peak, total_steps=STEPS, warmup="gradual", warmup_steps=3, warmup_start=peak / 4
    )
    sched = GradualWarmupScheduler(opt, schedule) if schedule is not None else None
    broadcast_state(model, opt, root_rank=0)
    single = mlp(seed=0)
    single_opt = create_optimizer(name, single.named_parameters(), **OPTIMIZERS[name], **path)
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
        "max_abs_vs_rank0": max_abs_vs_rank0(flat_values(model, opt), f"average.{name}.{passes}"),
        "checksum": checksum(flat_values(model, opt)),
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
    params_and_state = flat_values(model, opt, buffers=False)
    buffers = torch.cat([b.reshape(-1).to(torch.float64) for b in model.buffers()])
    return {
        "params_and_state_max_abs_vs_rank0": max_abs_vs_rank0(params_and_state, "bn.params"),
        "buffers_max_abs_vs_rank0": max_abs_vs_rank0(buffers, "bn.buffers"),
    }


def check_batchnorm_statistics_averaged() -> dict[str, Any]:
    """Ranks see different data (and rank r 2 + 2r batches); afterwards each holds the mean of the ranks' statistics."""
    rank = hvd.rank()
    model = cnn_with_bn(seed=30)
    model.train()
    for step in range(2 + 2 * rank):
        x, _ = global_batch(300 + 10 * rank + step, 1, LOCAL_BATCH, shape=(1, 10))
        model(x * (1 + rank))

    def statistics() -> dict[str, Any]:
        bn = model[1]
        return {
            "running_mean": bn.running_mean.tolist(),
            "running_var": bn.running_var.tolist(),
            "num_batches_tracked": int(bn.num_batches_tracked),
        }

    before = statistics()
    layers = average_batchnorm_statistics(model)
    return {"layers": layers, "before": before, "after": statistics()}


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
        "groups_before": [_jsonable(g) for g in expected_groups],
        "groups_after": [_jsonable({k: v for k, v in g.items() if k != "params"}) for g in ours.param_groups],
        "switches_before": expected_switches,
        "switches_after": ours.tensor_switches(),
        "classes": [[c.__name__ for c in type(o).__mro__] for o in (ours, theirs)],
        # a user predicate replaces the default rule: only 0.weight is excluded from adaptation
        "horovod_adapt_before": [r["adapt"] for r in source_switches],
        "horovod_adapt_after": [r["adapt"] for r in theirs.tensor_switches()],
        "horovod_backward_passes": ours.backward_passes_per_step,
    }


def _jsonable(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's settings as JSON values (anything else by its repr)."""
    plain = (bool, int, float, str, type(None))
    out = {}
    for key, value in group.items():
        if isinstance(value, plain) or isinstance(value, (list, tuple)) and all(isinstance(v, plain) for v in value):
            out[key] = list(value) if isinstance(value, tuple) else value
        else:
            out[key] = repr(value)
    return out


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
    weights_before = flat_values(model)
    state_before = checksum(torch.cat(_numbers(opt.state_dict())))
    tag = f"broadcast.{root_rank}.{int(root_fresh)}"
    root_weights = hvd.broadcast(weights_before, root_rank=root_rank, name=f"{tag}.weights")
    root_state = hvd.broadcast_object(state_before, root_rank=root_rank, name=f"{tag}.state")
    broadcast_state(model, opt, root_rank=root_rank)
    weights_after = flat_values(model)
    state_after = checksum(torch.cat(_numbers(opt.state_dict())))
    # the states must behave the same too: one more synchronised step keeps them identical
    x, y = global_batch(99, size, LOCAL_BATCH, shape=(1, 10))
    wrapped = DistributedOptimizer(opt)
    train_step(model, wrapped, *local_slice(x, y, rank, LOCAL_BATCH))
    # (BatchNorm running statistics then differ per rank: compare parameters and optimizer state)
    params_and_state = flat_values(model, wrapped, buffers=False)
    return {
        "weights_max_abs_vs_root_before": max_abs_difference(weights_after, root_weights),
        "state_checksum_after": state_after,
        "root_state_checksum_before": root_state,
        "state_entries": len(wrapped.state),
        "after_step_max_abs_vs_rank0": max_abs_vs_rank0(params_and_state, f"{tag}.after"),
        "skipped_steps": wrapped.skipped_steps,
    }


def check_nonfinite_skipped_on_all_ranks() -> dict[str, Any]:
    rank, size = hvd.rank(), hvd.size()
    model = mlp(seed=0)
    opt = DistributedOptimizer(LARS(model.named_parameters(), lr=1.0))
    x, y = global_batch(0, size, LOCAL_BATCH)
    xr, yr = local_slice(x, y, rank, LOCAL_BATCH)
    train_step(model, opt, xr, yr)
    before = flat_values(model, opt, skip_count=False)
    if rank == size - 1:
        xr = xr.clone()
        xr[0, 0] = math.nan  # only the last rank sees a NaN; after averaging every rank does
    train_step(model, opt, xr, yr)
    return {
        "nonfinite_max_abs_change": max_abs_difference(flat_values(model, opt, skip_count=False), before),
        "nonfinite_skipped": opt.skipped_steps,
        "nonfinite_weight_count": sum(int((~torch.isfinite(p)).sum()) for p in model.parameters()),
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
    uninterrupted = flat_values(model, opt)
    hvd.allreduce(torch.zeros(1), name="checkpoint.barrier")  # the file exists before anyone reads it
    resumed, resumed_opt, resumed_sched = build(seed=100 + rank)
    info = load_checkpoint(path, resumed, resumed_opt, resumed_sched)
    run(resumed, resumed_opt, resumed_sched, info["step"], 4)
    return {
        "checkpoint_wrote": wrote,
        "checkpoint_info": info,
        "checkpoint_max_abs_vs_uninterrupted": max_abs_difference(flat_values(resumed, resumed_opt), uninterrupted),
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
    for name in ("lars", "lamb"):
        results[f"numba/{name}"] = check_average_equals_concatenated_batch(name, passes=1, fused="numba")
    results["bn_model"] = check_bn_model_stays_identical()
    results["bn_average"] = check_batchnorm_statistics_averaged()
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
