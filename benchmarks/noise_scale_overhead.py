"""Overhead of the gradient-noise-scale monitor per training step, on the bench CNN under ``horovodrun -np 2``.

Trains the bench model (the MNIST-1D 1-D CNN with BatchNorm, 25k parameters)
with this package's ``DistributedOptimizer`` on two Gloo ranks, in variants
interleaved round by round so that load from other processes hits them
alike:

* PyTorch: ``off`` (no monitor), ``on/1`` (``NoiseScaleMonitor``, every
  step: local-norm hooks, one scalar allreduce overlapping the gradients',
  the averaged gradient's norm, the core update), ``on/10`` (every 10th step);
* Keras (``model.fit``-style ``train_on_batch``): ``off`` and
  ``DistributedOptimizer(noise_scale_interval=1)`` with the
  ``NoiseScaleMonitor`` callback, ``on/10`` likewise.

Prints, per variant, the median over all timed steps of the wall time and of
the process CPU time (all threads, Horovod's included) per step, each with its
ratio to ``off``. On a loaded machine the CPU-time ratio is the steadier
measure of what the monitor costs; the wall-time ratio is what a user waits. Each rank runs with ``--threads`` intra-op threads (default 1: two
ranks on a 2-core machine). Timings are of this machine and its load at the
time (printed).

Usage::

    python benchmarks/noise_scale_overhead.py                     # torch and keras, per-rank batch 256
    python benchmarks/noise_scale_overhead.py --framework torch --batch 64 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=("torch", "keras", "both"), default="both")
    parser.add_argument("--batch", type=int, default=256, help="per-rank batch size")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per turn")
    parser.add_argument("--rounds", type=int, default=40, help="turns of every variant (medians are over all steps)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--np", type=int, default=2, help="ranks (horovodrun -np, Gloo on localhost)")
    parser.add_argument("--worker", choices=("torch", "keras"), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def interleaved(steppers: dict[str, Callable[[], None]], steps: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per variant, the median over all timed steps of the wall time and of the process CPU time per step.

    Variants take turns every ``steps`` steps for ``rounds`` rounds (same order on
    every rank). The CPU time (all threads of the process, Horovod's included)
    is what the monitor costs this rank; the wall time also carries the
    machine's load.
    """
    for step in steppers.values():  # warm-up: allocations, tracing, Horovod negotiation caches
        for _ in range(5):
            step()
    wall: dict[str, list[float]] = {name: [] for name in steppers}
    cpu: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            for _ in range(steps):
                start, start_cpu = time.perf_counter(), time.process_time()
                step()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])} for name in steppers}


def torch_worker(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    from hvd_largebatch.torch_impl import SGD, DistributedOptimizer, NoiseScaleMonitor
    from hvd_largebatch.bench.torch_model import MNIST1DConvNet

    hvd.init()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(hvd.rank())
    x = torch.randn(args.batch, 40, generator=generator)
    y = torch.randint(0, 10, (args.batch,), generator=generator)

    def variant(interval: int | None) -> Callable[[], None]:
        torch.manual_seed(0)
        model = MNIST1DConvNet()
        opt = DistributedOptimizer(SGD(model.named_parameters(), lr=0.01, momentum=0.9))
        if interval is not None:
            NoiseScaleMonitor(opt, batch_size=args.batch, interval=interval)  # kept alive by opt.synchronize

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    return interleaved({"off": variant(None), "on/1": variant(1), "on/10": variant(10)}, args.steps, args.rounds)


def keras_worker(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import horovod.tensorflow as hvd
    import keras
    import numpy as np

    from hvd_largebatch.tf import SGD, DistributedOptimizer, NoiseScaleMonitor
    from hvd_largebatch.bench.keras_model import mnist1d_convnet

    hvd.init()
    rng = np.random.default_rng(hvd.rank())
    x = rng.normal(size=(args.batch, 40)).astype("float32")
    y = rng.integers(0, 10, size=args.batch)

    def variant(interval: int | None) -> Callable[[], None]:
        keras.utils.set_random_seed(0)
        model = mnist1d_convnet()
        opt = DistributedOptimizer(SGD(learning_rate=0.01, momentum=0.9), noise_scale_interval=interval)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
        model.train_on_batch(x[:2], y[:2])  # builds the optimizer
        monitor = None
        if interval is not None:
            monitor = NoiseScaleMonitor(batch_size=args.batch)
            monitor.set_model(model)
            monitor.on_train_begin()

        def step() -> None:
            model.train_on_batch(x, y)
            if monitor is not None:
                monitor.on_train_batch_end(0, {})

        return step

    return interleaved({"off": variant(None), "on/1": variant(1), "on/10": variant(10)}, args.steps, args.rounds)


def launch(framework: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    horovodrun = Path(sys.executable).with_name("horovodrun")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TF_CPP_MIN_LOG_LEVEL": "2",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "HOROVOD_GLOO_TIMEOUT_SECONDS": "300"}  # a loaded machine can take long to start both ranks
    cmd = [str(horovodrun), "-np", str(args.np), "-H", f"localhost:{args.np}", "--gloo", sys.executable, __file__,
           "--worker", framework, "--batch", str(args.batch), "--steps", str(args.steps),
           "--rounds", str(args.rounds), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    for line in proc.stdout.splitlines():
        if "NOISE_SCALE_RESULT " in line:
            return json.loads(line.split("NOISE_SCALE_RESULT ", 1)[1])
    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        medians = torch_worker(args) if args.worker == "torch" else keras_worker(args)
        if os.environ.get("HOROVOD_RANK", "0") == "0":
            print("NOISE_SCALE_RESULT " + json.dumps(medians), flush=True)
        return
    frameworks = ("torch", "keras") if args.framework == "both" else (args.framework,)
    load = os.getloadavg()
    print(f"noise-scale monitor overhead: bench CNN, {args.np} Gloo ranks, per-rank batch {args.batch}, "
          f"{args.threads} thread(s) per rank, {args.rounds} rounds x {args.steps} steps, "
          f"load average {load[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'framework':<10}{'variant':<9}{'wall ms':>9}{'ratio':>8}{'cpu ms':>9}{'ratio':>8}   (medians per step, rank 0)")
    for framework in frameworks:
        medians = launch(framework, args)
        off = medians["off"]
        for name, m in medians.items():
            print(f"{framework:<10}{name:<9}{1000 * m['wall']:>9.2f}{m['wall'] / off['wall']:>8.3f}"
                  f"{1000 * m['cpu']:>9.2f}{m['cpu'] / off['cpu']:>8.3f}")


if __name__ == "__main__":
    main()
