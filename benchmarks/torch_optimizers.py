"""Optimizer step time on ResNet-50's parameter shapes against the memory-bandwidth floor, and CLARS's per-step cost.

Usage::

    .venv/bin/python benchmarks/torch_optimizers.py [--rounds 25] [--threads 1] [--clock process|wall]

Part 1 builds ResNet-50's 161 parameter tensors (25,557,032 float32 values;
shapes written out below, as torchvision's ``resnet50``) with fixed random
gradients, one copy per optimizer, and times ``step()`` round-robin (one step
of each optimizer per round, so machine noise hits all alike), reporting
medians from one run. In the same rounds it times the in-place add
``a.add_(b)`` on two flat tensors of the same total size: that moves three
model-sized arrays (two reads, one write), so one *pass* (one read or one
write of a model-sized array) costs a third of it. (An out-of-place
``torch.add(a, b, out=c)`` also pays for reading ``c`` into the cache before
writing it: on this machine torch's fused SGD ran at 0.74x a floor timed that
way.) An optimizer's floor is its pass count times that:

* package SGD: 6 passes (the non-finite check reads ``g``; the update reads
  ``w``, ``g``, ``v`` and writes ``v``, ``w``);
* LARS / LARC: 7 (the norms read ``g`` and ``w``, which the non-finite check
  reuses; the update reads ``w``, ``g``, ``v`` and writes ``v``, ``w``);
* LAMB: 11 (the check reads ``g``; the moments and both norms read ``g``,
  ``mu``, ``nu``, ``w`` and write ``mu``, ``nu``; the weight update reads
  ``w``, ``mu``, ``nu`` and writes ``w``);
* torch SGD: 5 and torch AdamW: 7 (no norms, no check).

It prints each optimizer's time, floor and ratio, and the package's LARS
against ``torch.optim.SGD(momentum=0.9, weight_decay=1e-4)`` on each of
torch's paths (foreach, for-loop, fused). Each package optimizer runs with
``fused=True`` (torch's fused SGD kernel where it computes the rule, else
``foreach``; LAMB has no torch kernel), on the other torch paths, and with
``fused="numba"`` (compiled single-pass loops, ``torch_impl/cpu_kernels.py``;
its first step's wall time, which compiles the loops or loads them from
numba's disk cache, is printed apart as its warm-up). The default,
``fused=None``, is the numba loops with one intra-op thread and
``fused=True`` with more; the header says which the run's threads pick.

Part 2 times one training step (forward, backward, optimizer step) of a small
1-D CNN with BatchNorm at batch 128 with LARS, and with CLARS measuring
per-example norms exactly (``add_grad_norms``: ghost-norm rules in a separate
pass) or with ``microbatch:8``, and prints the overhead against LARS
(``benchmarks/clars_step_time.py`` compares every way of measuring them, in
both frameworks).

Times are the process's CPU time per step by default (``--clock process``):
with one intra-op thread that equals the wall time on an idle machine and
stays meaningful on a shared one, where other jobs inflate wall times
(``--clock wall`` measures those instead). The header prints the threads
and the machine's load average.

Speed is measured here and reported as ratios, never asserted in tests.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hvd_largebatch.torch_impl import CLARS, LAMB, LARS, SGD

CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["process"]

#: ResNet-50's parameter tensors in ``model.named_parameters()`` order.
RESNET50_SHAPES = (
    ("conv1.weight", (64, 3, 7, 7)),
    ("bn1.weight", (64,)),
    ("bn1.bias", (64,)),
    ("layer1.0.conv1.weight", (64, 64, 1, 1)),
    ("layer1.0.bn1.weight", (64,)),
    ("layer1.0.bn1.bias", (64,)),
    ("layer1.0.conv2.weight", (64, 64, 3, 3)),
    ("layer1.0.bn2.weight", (64,)),
    ("layer1.0.bn2.bias", (64,)),
    ("layer1.0.conv3.weight", (256, 64, 1, 1)),
    ("layer1.0.bn3.weight", (256,)),
    ("layer1.0.bn3.bias", (256,)),
    ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
    ("layer1.0.downsample.1.weight", (256,)),
    ("layer1.0.downsample.1.bias", (256,)),
    ("layer1.1.conv1.weight", (64, 256, 1, 1)),
    ("layer1.1.bn1.weight", (64,)),
    ("layer1.1.bn1.bias", (64,)),
    ("layer1.1.conv2.weight", (64, 64, 3, 3)),
    ("layer1.1.bn2.weight", (64,)),
    ("layer1.1.bn2.bias", (64,)),
    ("layer1.1.conv3.weight", (256, 64, 1, 1)),
    ("layer1.1.bn3.weight", (256,)),
    ("layer1.1.bn3.bias", (256,)),
    ("layer1.2.conv1.weight", (64, 256, 1, 1)),
    ("layer1.2.bn1.weight", (64,)),
    ("layer1.2.bn1.bias", (64,)),
    ("layer1.2.conv2.weight", (64, 64, 3, 3)),
    ("layer1.2.bn2.weight", (64,)),
    ("layer1.2.bn2.bias", (64,)),
    ("layer1.2.conv3.weight", (256, 64, 1, 1)),
    ("layer1.2.bn3.weight", (256,)),
    ("layer1.2.bn3.bias", (256,)),
    ("layer2.0.conv1.weight", (128, 256, 1, 1)),
    ("layer2.0.bn1.weight", (128,)),
    ("layer2.0.bn1.bias", (128,)),
    ("layer2.0.conv2.weight", (128, 128, 3, 3)),
    ("layer2.0.bn2.weight", (128,)),
    ("layer2.0.bn2.bias", (128,)),
    ("layer2.0.conv3.weight", (512, 128, 1, 1)),
    ("layer2.0.bn3.weight", (512,)),
    ("layer2.0.bn3.bias", (512,)),
    ("layer2.0.downsample.0.weight", (512, 256, 1, 1)),
    ("layer2.0.downsample.1.weight", (512,)),
    ("layer2.0.downsample.1.bias", (512,)),
    ("layer2.1.conv1.weight", (128, 512, 1, 1)),
    ("layer2.1.bn1.weight", (128,)),
    ("layer2.1.bn1.bias", (128,)),
    ("layer2.1.conv2.weight", (128, 128, 3, 3)),
    ("layer2.1.bn2.weight", (128,)),
    ("layer2.1.bn2.bias", (128,)),
    ("layer2.1.conv3.weight", (512, 128, 1, 1)),
    ("layer2.1.bn3.weight", (512,)),
    ("layer2.1.bn3.bias", (512,)),
    ("layer2.2.conv1.weight", (128, 512, 1, 1)),
    ("layer2.2.bn1.weight", (128,)),
    ("layer2.2.bn1.bias", (128,)),
    ("layer2.2.conv2.weight", (128, 128, 3, 3)),
    ("layer2.2.bn2.weight", (128,)),
    ("layer2.2.bn2.bias", (128,)),
    ("layer2.2.conv3.weight", (512, 128, 1, 1)),
    ("layer2.2.bn3.weight", (512,)),
    ("layer2.2.bn3.bias", (512,)),
    ("layer2.3.conv1.weight", (128, 512, 1, 1)),
    ("layer2.3.bn1.weight", (128,)),
    ("layer2.3.bn1.bias", (128,)),
    ("layer2.3.conv2.weight", (128, 128, 3, 3)),
    ("layer2.3.bn2.weight", (128,)),
    ("layer2.3.bn2.bias", (128,)),
    ("layer2.3.conv3.weight", (512, 128, 1, 1)),
    ("layer2.3.bn3.weight", (512,)),
    ("layer2.3.bn3.bias", (512,)),
    ("layer3.0.conv1.weight", (256, 512, 1, 1)),
    ("layer3.0.bn1.weight", (256,)),
    ("layer3.0.bn1.bias", (256,)),
    ("layer3.0.conv2.weight", (256, 256, 3, 3)),
    ("layer3.0.bn2.weight", (256,)),
    ("layer3.0.bn2.bias", (256,)),
    ("layer3.0.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.0.bn3.weight", (1024,)),
    ("layer3.0.bn3.bias", (1024,)),
    ("layer3.0.downsample.0.weight", (1024, 512, 1, 1)),
    ("layer3.0.downsample.1.weight", (1024,)),
    ("layer3.0.downsample.1.bias", (1024,)),
    ("layer3.1.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.1.bn1.weight", (256,)),
    ("layer3.1.bn1.bias", (256,)),
    ("layer3.1.conv2.weight", (256, 256, 3, 3)),
    ("layer3.1.bn2.weight", (256,)),
    ("layer3.1.bn2.bias", (256,)),
    ("layer3.1.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.1.bn3.weight", (1024,)),
    ("layer3.1.bn3.bias", (1024,)),
    ("layer3.2.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.2.bn1.weight", (256,)),
    ("layer3.2.bn1.bias", (256,)),
    ("layer3.2.conv2.weight", (256, 256, 3, 3)),
    ("layer3.2.bn2.weight", (256,)),
    ("layer3.2.bn2.bias", (256,)),
    ("layer3.2.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.2.bn3.weight", (1024,)),
    ("layer3.2.bn3.bias", (1024,)),
    ("layer3.3.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.3.bn1.weight", (256,)),
    ("layer3.3.bn1.bias", (256,)),
    ("layer3.3.conv2.weight", (256, 256, 3, 3)),
    ("layer3.3.bn2.weight", (256,)),
    ("layer3.3.bn2.bias", (256,)),
    ("layer3.3.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.3.bn3.weight", (1024,)),
    ("layer3.3.bn3.bias", (1024,)),
    ("layer3.4.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.4.bn1.weight", (256,)),
    ("layer3.4.bn1.bias", (256,)),
    ("layer3.4.conv2.weight", (256, 256, 3, 3)),
    ("layer3.4.bn2.weight", (256,)),
    ("layer3.4.bn2.bias", (256,)),
    ("layer3.4.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.4.bn3.weight", (1024,)),
    ("layer3.4.bn3.bias", (1024,)),
    ("layer3.5.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.5.bn1.weight", (256,)),
    ("layer3.5.bn1.bias", (256,)),
    ("layer3.5.conv2.weight", (256, 256, 3, 3)),
    ("layer3.5.bn2.weight", (256,)),
    ("layer3.5.bn2.bias", (256,)),
    ("layer3.5.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.5.bn3.weight", (1024,)),
    ("layer3.5.bn3.bias", (1024,)),
    ("layer4.0.conv1.weight", (512, 1024, 1, 1)),
    ("layer4.0.bn1.weight", (512,)),
    ("layer4.0.bn1.bias", (512,)),
    ("layer4.0.conv2.weight", (512, 512, 3, 3)),
    ("layer4.0.bn2.weight", (512,)),
    ("layer4.0.bn2.bias", (512,)),
    ("layer4.0.conv3.weight", (2048, 512, 1, 1)),
    ("layer4.0.bn3.weight", (2048,)),
    ("layer4.0.bn3.bias", (2048,)),
    ("layer4.0.downsample.0.weight", (2048, 1024, 1, 1)),
    ("layer4.0.downsample.1.weight", (2048,)),
    ("layer4.0.downsample.1.bias", (2048,)),
    ("layer4.1.conv1.weight", (512, 2048, 1, 1)),
    ("layer4.1.bn1.weight", (512,)),
    ("layer4.1.bn1.bias", (512,)),
    ("layer4.1.conv2.weight", (512, 512, 3, 3)),
    ("layer4.1.bn2.weight", (512,)),
    ("layer4.1.bn2.bias", (512,)),
    ("layer4.1.conv3.weight", (2048, 512, 1, 1)),
    ("layer4.1.bn3.weight", (2048,)),
    ("layer4.1.bn3.bias", (2048,)),
    ("layer4.2.conv1.weight", (512, 2048, 1, 1)),
    ("layer4.2.bn1.weight", (512,)),
    ("layer4.2.bn1.bias", (512,)),
    ("layer4.2.conv2.weight", (512, 512, 3, 3)),
    ("layer4.2.bn2.weight", (512,)),
    ("layer4.2.bn2.bias", (512,)),
    ("layer4.2.conv3.weight", (2048, 512, 1, 1)),
    ("layer4.2.bn3.weight", (2048,)),
    ("layer4.2.bn3.bias", (2048,)),
    ("fc.weight", (1000, 2048)),
    ("fc.bias", (1000,)),

)
RESNET50_PARAMETERS = 25_557_032


def resnet50_tensors(seed: int = 0) -> tuple[list[tuple[str, torch.Tensor]], list[torch.Tensor]]:
    """Weights (He-like scale) and gradients for every ResNet-50 tensor."""
    generator = torch.Generator().manual_seed(seed)
    weights, grads = [], []
    for name, shape in RESNET50_SHAPES:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        weights.append((name, torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)))
        grads.append(torch.randn(shape, generator=generator) * 1e-3)
    return weights, grads


#: The floor's operation: three model-sized arrays moved (two reads, one write).
FLOOR = "in-place add (floor)"
ADD_PASSES = 3


def optimizer_factories() -> dict[str, tuple[int, object]]:
    """Name -> (passes of the floor, callable(named params) -> optimizer)."""
    torch_sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    plain = lambda p: [t for _, t in p]  # noqa: E731 - torch's optimizers take bare tensors here
    return {
        "torch SGD foreach": (5, lambda p: torch.optim.SGD(plain(p), **torch_sgd, foreach=True)),
        "torch SGD for-loop": (5, lambda p: torch.optim.SGD(plain(p), **torch_sgd, foreach=False)),
        "torch SGD fused": (5, lambda p: torch.optim.SGD(plain(p), **torch_sgd, fused=True)),
        "torch AdamW foreach": (7, lambda p: torch.optim.AdamW(plain(p), lr=1e-3, weight_decay=0.01, foreach=True)),
        "torch AdamW fused": (7, lambda p: torch.optim.AdamW(plain(p), lr=1e-3, weight_decay=0.01, fused=True)),
        "SGD fused": (6, lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)),
        "SGD foreach": (6, lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=False)),
        "LARS fused": (7, lambda p: LARS(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)),
        "LARS foreach": (7, lambda p: LARS(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=False)),
        "LARS single-tensor": (7, lambda p: LARS(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=False,
                                                 foreach=False)),
        "LARC fused": (7, lambda p: LARS(p, lr=0.1, momentum=0.9, weight_decay=1e-4, clip=True, fused=True)),
        "SGD numba": (6, lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused="numba")),
        "LARS numba": (7, lambda p: LARS(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused="numba")),
        "LARC numba": (7, lambda p: LARS(p, lr=0.1, momentum=0.9, weight_decay=1e-4, clip=True, fused="numba")),
        "LAMB foreach": (11, lambda p: LAMB(p, lr=1e-3, weight_decay=0.01, fused=True)),
        "LAMB numba": (11, lambda p: LAMB(p, lr=1e-3, weight_decay=0.01, fused="numba")),
        "LAMB single-tensor": (11, lambda p: LAMB(p, lr=1e-3, weight_decay=0.01, foreach=False, fused=False)),
    }


def time_optimizer_steps(rounds: int, warmup: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per ``step()`` of every optimizer and of the floor's in-place add, measured round-robin;
    and the wall seconds of each one's first step (warm-up)."""
    weights, grads = resnet50_tensors()
    assert len(weights) == 161 and sum(t.numel() for _, t in weights) == RESNET50_PARAMETERS
    steps = {}
    for name, (_, factory) in optimizer_factories().items():
        params = [(n, torch.nn.Parameter(t.clone())) for n, t in weights]
        for (_, p), g in zip(params, grads):
            p.grad = g.clone()
        steps[name] = factory(params).step
    a, b = (torch.randn(RESNET50_PARAMETERS) for _ in range(2))
    steps[FLOOR] = lambda: a.add_(b)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    first_steps = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        first_steps[name] = time.perf_counter() - start
    for round_index in range(warmup + rounds):
        for name, step in steps.items():
            start = clock()
            step()
            elapsed = clock() - start
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}, first_steps


def _bench_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 16, 5, padding=2), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        torch.nn.Conv1d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
        torch.nn.Conv1d(32, 32, 3, stride=2, padding=1), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 10, 10),
    )


def time_clars_overhead(rounds: int, batch: int = 128, warmup: int = 2) -> dict[str, float]:
    """Median seconds per training step on the bench CNN: LARS vs CLARS exact / microbatch:8."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 40, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    setups = {}
    for name, estimator in (("LARS", None), ("CLARS exact (chunk 32)", "exact"), ("CLARS exact (chunk 128)", "exact:128"),
                            ("CLARS microbatch:8", "microbatch:8")):
        torch.manual_seed(0)
        model = _bench_cnn()
        if estimator is None:
            opt = LARS(model.named_parameters(), lr=1.0)
        elif estimator == "exact:128":
            opt = CLARS(model.named_parameters(), lr=1.0, estimator="exact", chunk_size=128)
        else:
            opt = CLARS(model.named_parameters(), lr=1.0, estimator=estimator)
        setups[name] = (model, opt)
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for round_index in range(warmup + rounds):
        for name, (model, opt) in setups.items():
            start = clock()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if isinstance(opt, CLARS):
                opt.add_grad_norms(model, F.cross_entropy, x, y)
            opt.step()
            elapsed = clock() - start
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="timed steps per optimizer (default 25)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process",
                        help="process CPU time (default) or wall time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]

    load_before = os.getloadavg()[0]
    times, first_steps = time_optimizer_steps(args.rounds)
    one_pass = times[FLOOR] / ADD_PASSES
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.clock} time, load average {load_before:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after part 1 on {os.cpu_count()} CPUs")
    print(f"ResNet-50 shapes: 161 tensors, {RESNET50_PARAMETERS:,} float32 parameters; median of {args.rounds} steps")
    print(f"floor: in-place a.add_(b) over {RESNET50_PARAMETERS:,} values = {times[FLOOR] * 1e3:.2f} ms "
          f"for {ADD_PASSES} passes, one pass = {one_pass * 1e3:.2f} ms")
    print(f"{'optimizer':<22} {'ms/step':>9} {'passes':>7} {'floor ms':>9} {'/floor':>7}")
    floors = {}
    for name, (passes, _) in optimizer_factories().items():
        floors[name] = times[name] / (passes * one_pass)
        print(f"{name:<22} {times[name] * 1e3:9.2f} {passes:7d} {passes * one_pass * 1e3:9.2f} {floors[name]:7.2f}")
    default = "numba" if args.threads == 1 else "fused=True"
    for path, rows in (("fused=True", ("SGD fused", "LARS fused", "LARC fused", "LAMB foreach")),
                       ('fused="numba"', ("SGD numba", "LARS numba", "LARC numba", "LAMB numba"))):
        sgd, lars, larc, lamb = (floors[row] for row in rows)
        print(f"targets, {path}{' (the default at this thread count)' if default in path else ''}: "
              f"SGD {sgd:.2f}x its floor (<= 1.25), LARS {lars:.2f}x (<= 1.25), LARC {larc:.2f}x (<= 1.25), "
              f"LAMB {lamb:.2f}x (<= 1.3)")
    print('warm-up (first step, wall time; fused="numba" compiles its loops or loads them from the disk cache): '
          + ", ".join(f"{name} {first_steps[name]:.2f} s" for name in optimizer_factories() if "numba" in name))
    for lars in ("LARS fused", "LARS numba"):
        print(f"{lars} / torch SGD: " + ", ".join(
            f"{path} {times[lars] / times['torch SGD ' + path]:.2f}" for path in ("foreach", "for-loop", "fused")
        ) + " (target: below 1 against foreach)")

    overhead = time_clars_overhead(max(5, args.rounds // 2))
    base = overhead["LARS"]
    parameters = sum(p.numel() for p in _bench_cnn().parameters())
    print()
    print(f"training step (forward, backward, step) of a 1-D CNN with BatchNorm ({parameters:,} parameters), batch 128")
    print(f"{'optimizer':<26} {'ms/step':>9} {'vs LARS':>8}")
    for name, seconds in overhead.items():
        print(f"{name:<26} {seconds * 1e3:9.2f} {seconds / base:8.2f}")


if __name__ == "__main__":
    main()
