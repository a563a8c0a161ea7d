"""Training-step time of the package on Horovod (LARS, its DistributedOptimizer, warmup) against plain Horovod SGD.

Usage::

    .venv/bin/python benchmarks/horovod_step_overhead.py [--rounds 40] [--warmup 5] [--threads 1] [--batch 64]
                                                         [--np 2] [--timeout 600]

Run as above, the script launches itself on ``--np`` local ranks with
``horovodrun -np N -H localhost:N --gloo`` (``python ... --worker``), shows
rank 0's output and kills the job when it runs past ``--timeout`` seconds, so
a hang fails instead of waiting forever. Started by ``horovodrun`` directly
(``horovodrun -np 2 -H localhost:2 --gloo python benchmarks/horovod_step_overhead.py``)
it runs as a rank on the world it finds (``--np`` is then ignored).

Each rank builds a small compute-bound 2-D CNN (four 3x3 conv layers with
BatchNorm and ReLU, widths 16-32-64-64, global average pooling, a linear
layer to 10 classes; 3x32x32 inputs) with fixed seeds, and holds a few
random batches of ``--batch`` examples in memory (different on each rank).
Three copies of the model, with the same initial weights, train side by side:

* ``A``: plain Horovod: ``torch.optim.SGD(lr=0.1, momentum=0.9,
  weight_decay=5e-4)`` wrapped in ``horovod.torch.DistributedOptimizer``;
* ``B``: the package, as its module example trains: ``LARS(model.named_parameters(),
  lr=0.1, momentum=0.9, weight_decay=5e-4)`` wrapped in the package's
  ``DistributedOptimizer``, with a ``GradualWarmupScheduler`` over
  ``schedules.goyal`` stepped after every update, state broadcast with
  ``broadcast_state``;
* ``C``: ``B`` without the scheduler (constant LR), which splits B's extra
  cost into LARS's (C/A) and the scheduler's (B/C).

The schedule is ``goyal(0.1, base, global_batch, steps_per_epoch=S,
epochs=90)`` with ``S`` the number of steps the run makes, so every step lies
in the 5-epoch warmup: the LR changes at each update and LARS's momentum
correction does real work. ``base`` is 256, or half the global batch when
that is smaller (``goyal`` refuses a warmup that would lower the LR).
The three Horovod optimizers need distinct allreduce names: each is given
``named_parameters`` with its own prefix (``A.``, ``B.``, ``C.``).

A timed step is a full training step: ``zero_grad``, forward, backward (whose
hooks start the gradient allreduces), ``step`` (which waits for them) and,
for B, ``sched.step()``, timed with ``time.perf_counter`` on every rank. The
setups are interleaved: each round runs one step of each (the order rotating
by one every round), so load from other processes hits them alike;
``--warmup`` rounds are run untimed first. The allreduce inside ``step``
keeps the ranks in lockstep, so a step's time is taken as the slowest rank's
(the per-rank times are gathered after the loop). Rank 0 prints the median
and the 25th-75th percentiles of each setup, B/A both as a ratio of medians
and as the median of per-round ratios (each round's B step against the same
round's A step), against the target "within 3% of plain Horovod"
(``<= 1.03x``), with the threads per rank, the machine's load average and the
torch and Horovod versions. Since other jobs on a shared machine inflate
wall times, it also prints the median CPU time per step of each setup
(``time.process_time``: the rank's own threads, Horovod's background thread
included; time spent blocked does not count). Last, it checks that every
setup's weights are bit-identical on all ranks after the run and that LARS
skipped no step.

Speed is measured here and reported as ratios, never asserted in tests.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETUPS = ("A", "B", "C")
LABELS = {
    "A": "plain Horovod: torch SGD + hvd.DistributedOptimizer",
    "B": "package: LARS + DistributedOptimizer + warmup",
    "C": "package without the scheduler",
}
TARGET = 1.03
BASE_LR = 0.1
BASE_BATCH = 256
#: horovodrun's prefix on a rank's lines (Gloo ``[rank]<stdout>:``, MPI ``[job,rank]<stdout>:``).
RANK_LINE = re.compile(r"^\[(?:\d+,)?(\d+)\]<(stdout|stderr)>:(.*)$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds, one step of each setup (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (default 1)")
    parser.add_argument("--batch", type=int, default=64, help="examples per rank per step (default 64)")
    parser.add_argument("--np", type=int, default=2, help="Horovod ranks to launch (default 2)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds before the launched job is killed as hung (default 600)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a rank started by horovodrun
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be an integer >= 2 (percentiles need two steps), got {args.rounds}")
    if args.warmup < 0:
        parser.error(f"--warmup must be an integer >= 0, got {args.warmup}")
    if args.threads < 1:
        parser.error(f"--threads must be an integer >= 1, got {args.threads}")
    if args.batch < 2:
        parser.error(f"--batch must be an integer >= 2 (BatchNorm needs two examples), got {args.batch}")
    if args.np < 1:
        parser.error(f"--np must be an integer >= 1, got {args.np}")
    if not args.timeout > 0 or args.timeout == float("inf"):
        parser.error(f"--timeout must be a finite number of seconds > 0, got {args.timeout:g}")
    return args


def inside_horovod_job() -> bool:
    return any(name in os.environ for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


# -------------------------------------------------------------------------------------- launcher
def horovodrun_path() -> str:
    beside_python = Path(sys.executable).with_name("horovodrun")
    if beside_python.exists():
        return str(beside_python)
    raise SystemExit(f"horovod_step_overhead: horovodrun not found next to {sys.executable}: run `make setup`")


def launch(args: argparse.Namespace) -> int:
    """Runs this script on ``args.np`` ranks under horovodrun; echoes rank 0's stdout; returns the exit status."""
    workers = str(args.np)
    command = [horovodrun_path(), "-np", workers, "-H", f"localhost:{workers}", "--gloo", "--start-timeout", "120",
               sys.executable, str(Path(__file__).resolve()), "--worker",
               "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--batch", str(args.batch)]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    # Its own session, so that on a timeout the whole job (horovodrun and the ranks it started) can be stopped.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=args.timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
    lines = output.splitlines()
    rank0 = [m.group(3) for m in map(RANK_LINE.match, lines) if m and m.group(1) == "0" and m.group(2) == "stdout"]
    if timed_out or process.returncode != 0:
        print("\n".join(lines[-40:]), file=sys.stderr)
        cause = f"timed out after {args.timeout:g} s" if timed_out else f"exited with status {process.returncode}"
        print(f"horovod_step_overhead: the horovodrun job {cause}: {' '.join(command)}", file=sys.stderr)
        return 1
    print("\n".join(rank0 if rank0 else lines))
    return 0


# ---------------------------------------------------------------------------------------- worker
def build_cnn():
    import torch.nn as nn

    layers = []
    for c_in, c_out, stride in ((3, 16, 1), (16, 32, 2), (32, 64, 2), (64, 64, 1)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def percentile_ms(samples: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles of ``samples`` (seconds) in milliseconds."""
    p25, p50, p75 = statistics.quantiles(samples, n=4, method="inclusive")
    return 1e3 * p25, 1e3 * p50, 1e3 * p75


def run_worker(args: argparse.Namespace) -> None:
    import copy

    import horovod
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    from hvd_largebatch import schedules
    from hvd_largebatch.torch_impl import LARS, DistributedOptimizer, GradualWarmupScheduler, broadcast_state

    hvd.init()
    torch.set_num_threads(args.threads)
    rank, size = hvd.rank(), hvd.size()
    load_before = os.getloadavg()[0]

    torch.manual_seed(0)
    template = build_cnn()
    models = {name: copy.deepcopy(template) for name in SETUPS}
    generator = torch.Generator().manual_seed(1000 + rank)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=generator),
                torch.randint(0, 10, (args.batch,), generator=generator)) for _ in range(4)]

    def prefixed(name: str) -> list:
        return [(f"{name}.{n}", p) for n, p in models[name].named_parameters()]

    steps = args.warmup + args.rounds
    global_batch = args.batch * size
    base_batch = min(BASE_BATCH, max(1, global_batch // 2))
    schedule = schedules.goyal(BASE_LR, base_batch, global_batch, steps_per_epoch=steps, epochs=90)

    plain = torch.optim.SGD(models["A"].parameters(), lr=BASE_LR, momentum=0.9, weight_decay=5e-4)
    optimizers = {"A": hvd.DistributedOptimizer(plain, named_parameters=prefixed("A"))}
    for name in ("B", "C"):
        lars = LARS(models[name].named_parameters(), lr=BASE_LR, momentum=0.9, weight_decay=5e-4)
        optimizers[name] = DistributedOptimizer(lars, named_parameters=prefixed(name))
    scheduler = GradualWarmupScheduler(optimizers["B"], schedule)
    hvd.broadcast_parameters(models["A"].state_dict(), root_rank=0)
    for name in ("B", "C"):
        broadcast_state(models[name], optimizers[name], root_rank=0)

    def train_step(name: str, x, y) -> tuple[float, float]:
        model, opt = models[name], optimizers[name]
        start, cpu_start = time.perf_counter(), time.process_time()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if name == "B":
            scheduler.step()
        return time.perf_counter() - start, time.process_time() - cpu_start

    times: dict[str, list[float]] = {name: [] for name in SETUPS}
    cpu_times: dict[str, list[float]] = {name: [] for name in SETUPS}
    for round_index in range(steps):
        x, y = batches[round_index % len(batches)]
        shift = round_index % len(SETUPS)
        for name in SETUPS[shift:] + SETUPS[:shift]:
            elapsed, cpu = train_step(name, x, y)
            if round_index >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
    load_after = os.getloadavg()[0]

    gathered = hvd.allgather_object((times, cpu_times), name="step_times")

    def slowest_rank(which: int) -> dict[str, list[float]]:
        return {name: [max(per_rank[which][name][i] for per_rank in gathered) for i in range(args.rounds)]
                for name in SETUPS}

    slowest, slowest_cpu = slowest_rank(0), slowest_rank(1)
    identical = {}
    for name in SETUPS:
        flat = torch.cat([p.detach().flatten() for p in models[name].parameters()]).unsqueeze(0)
        everyone = hvd.allgather(flat, name=f"weights.{name}")
        identical[name] = bool((everyone == everyone[0]).all())
    if rank != 0:
        return

    stats = {name: percentile_ms(slowest[name]) for name in SETUPS}
    base = stats["A"][1]
    per_round = [b / a for a, b in zip(slowest["A"], slowest["B"])]
    ratio_of_medians = stats["B"][1] / base
    ratio_per_round = statistics.median(per_round)
    parameters = sum(p.numel() for p in template.parameters())
    verdict = "within" if max(ratio_of_medians, ratio_per_round) <= TARGET else "above"
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"Horovod {horovod.__version__} (Gloo), {size} rank(s) x {args.threads} thread(s)")
    print(f"load average {load_before:.1f} before / {load_after:.1f} after the run, on {os.cpu_count()} CPUs")
    print(f"2-D CNN, 4 conv+BatchNorm layers, {parameters:,} parameters, 3x32x32 inputs; batch {args.batch} per rank "
          f"(global {global_batch})")
    print(f"wall time per training step (slowest rank), {args.rounds} interleaved rounds after {args.warmup} untimed")
    print(f"{'setup':<56} {'median ms':>9} {'p25 ms':>8} {'p75 ms':>8} {'vs A':>6}")
    for name in SETUPS:
        p25, p50, p75 = stats[name]
        print(f"{name}  {LABELS[name]:<53} {p50:9.2f} {p25:8.2f} {p75:8.2f} {p50 / base:6.3f}")
    low, _, high = statistics.quantiles(per_round, n=4, method="inclusive")
    print(f"B/A: {ratio_of_medians:.3f} (ratio of medians), {ratio_per_round:.3f} (median of per-round ratios, "
          f"p25-p75 {low:.3f}-{high:.3f}); target <= {TARGET:.2f}x: {verdict}")
    print(f"split: LARS + package wrapper C/A {stats['C'][1] / base:.3f}, "
          f"scheduler B/C {stats['B'][1] / stats['C'][1]:.3f}")
    cpu = {name: 1e3 * statistics.median(slowest_cpu[name]) for name in SETUPS}
    print(f"CPU time per step (process clock, slowest rank), median ms: "
          f"A {cpu['A']:.2f}, B {cpu['B']:.2f}, C {cpu['C']:.2f}; B/A {cpu['B'] / cpu['A']:.3f}")
    print(f"schedule (B): {schedule.describe()}")
    print(f"B's LR went from {schedule(0):g} to {schedule(steps):g} over the run's {steps} steps")
    skipped = {name: getattr(optimizers[name], "skipped_steps", 0) for name in ("B", "C")}
    print(f"LARS skipped steps: B {skipped['B']}, C {skipped['C']}; weights bit-identical on all ranks: "
          + ", ".join(f"{name} {'yes' if same else 'NO'}" for name, same in identical.items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker or inside_horovod_job():
        run_worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
