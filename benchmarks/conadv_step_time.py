"""Step time of ConAdv (concurrent) vs sequential adversarial training vs clean training, on the bench model.

Prints, for one run on this machine, the median time per training step of

* ``clean``: ordinary training (forward, backward, optimizer step);
* ``sequential``: adversarial training with ``staleness=0`` (attack, then clean
  and adversarial forward/backward, one after the other);
* ``stale``: ConAdv with ``staleness=1`` but ``concurrent=False`` (same work as
  sequential; shows that staleness alone costs nothing);
* ``concurrent``: ConAdv with ``staleness=1``, the attack of the next batch on a
  background thread (PyTorch);

with ratios to ``clean``, and the split of the adversarial step into its parts
(attack; clean forward+backward; adversarial forward+backward) and the
ConAdv step with the attack removed (``floor``: what concurrency can reach at
best), from which the share of the attack that concurrency hides is computed::

    hidden = (sequential - concurrent) / (sequential - floor)

PyTorch runs with 1 and with 2 intra-op threads (on a 2-core machine, 1
thread leaves the second core to the background attack; 2 threads make the
attack compete with the step's own parallelism). Keras (``clean``, ConAdv
with ``staleness`` 0 and 1: in Keras both overlap the attack with the clean
half of the step, see ``hvd_largebatch.tf.conadv``) runs in subprocesses with
TensorFlow's inter-op pool at 1 (branches serialised) and 2 (the attack
branch may run beside the clean branch). The variants are interleaved round by
round, so that load from other processes affects them alike; the medians over
rounds are reported. Timings are of this machine only; see the README for the
GPU reasoning.

Usage::

    python benchmarks/conadv_step_time.py                 # torch and keras, batches 256 and 1024
    python benchmarks/conadv_step_time.py --framework torch --batch 1024 --rounds 7
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

VARIANTS = ("clean", "sequential", "stale", "concurrent")
PARTS = ("attack", "clean_fwd_bwd", "adversarial_fwd_bwd")
EPSILON = 0.35  # the bench's MNIST-1D setting (hvd_largebatch.bench.recipes.CONADV_ARGS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=("torch", "keras", "both"), default="both")
    parser.add_argument("--batch", default="256,1024", help="per-worker batch sizes (comma-separated)")
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are over rounds)")
    parser.add_argument("--threads", default="1,2", help="torch intra-op thread counts to measure")
    parser.add_argument("--keras-repeats", type=int, default=3, help="Keras processes per pool size (median)")
    parser.add_argument("--keras-worker", type=int, default=None, help=argparse.SUPPRESS)  # inter-op threads
    return parser.parse_args(argv)


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def interleaved(steppers: dict[str, Callable[[], None]], steps: int, rounds: int) -> dict[str, float]:
    """Median over rounds of the mean seconds per call of each stepper, variants interleaved."""
    for step in steppers.values():  # warm-up (allocations, thread start, tracing)
        for _ in range(2):
            step()
    per_round: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            per_round[name].append((time.perf_counter() - start) / steps)
    return {name: median_ms(samples) for name, samples in per_round.items()}


# ------------------------------------------------------------------------------------ PyTorch
def torch_measure(batch: int, steps: int, rounds: int, threads: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from hvd_largebatch.torch_impl import LARS
    from hvd_largebatch.torch_impl.conadv import ConAdv, _Snapshot, make_adversarial_examples
    from hvd_largebatch.torch_impl.dual_bn import auxiliary_bn, convert_to_dual_bn
    from hvd_largebatch.bench.torch_model import MNIST1DConvNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = convert_to_dual_bn(MNIST1DConvNet())
    opt = LARS(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    data = [(torch.randn(batch, 40), torch.randint(0, 10, (batch,))) for _ in range(8)]
    settings = dict(epsilon=EPSILON, step_size=EPSILON, input_range=None, seed=0)

    def training_step(stream, conadv):
        def step() -> None:
            (x, y), ahead = next(stream)
            opt.zero_grad()
            loss = conadv.loss(x, y, ahead) if conadv is not None else F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        return step

    helpers = {
        "sequential": ConAdv(model, staleness=0, **settings),
        "stale": ConAdv(model, staleness=1, concurrent=False, **settings),
        "concurrent": ConAdv(model, staleness=1, concurrent=True, **settings),
    }
    steppers = {"clean": training_step(((b, None) for b in itertools.cycle(data)), None)}
    for name, helper in helpers.items():
        steppers[name] = training_step(helper.lookahead(itertools.cycle(data)), helper)

    snapshot = _Snapshot(model)
    snapshot.refresh(model, 0)
    x, y = data[0]
    x_adv = x + 0.1

    def attack() -> None:
        with auxiliary_bn(snapshot.module):
            make_adversarial_examples(snapshot.module, x, y, **{k: v for k, v in settings.items() if k != "seed"})

    def clean_fwd_bwd() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def adversarial_fwd_bwd() -> None:
        opt.zero_grad()
        with auxiliary_bn(model):
            F.cross_entropy(model(x_adv), y).backward()

    def free_attack() -> None:
        # ConAdv's step with the attack removed (adversarial batch given): the floor concurrency can reach.
        snapshot.refresh(model, 0)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        with auxiliary_bn(model):
            loss = loss + F.cross_entropy(model(x_adv), y)
        loss.backward()
        opt.step()

    steppers.update(
        free_attack=free_attack, attack=attack, clean_fwd_bwd=clean_fwd_bwd, adversarial_fwd_bwd=adversarial_fwd_bwd
    )
    try:
        return interleaved(steppers, steps, rounds)
    finally:
        for helper in helpers.values():
            helper.close()


# -------------------------------------------------------------------------------------- Keras
def keras_worker(batch: int, steps: int, rounds: int, inter_op: int) -> dict[str, float]:
    """Runs in its own process: TensorFlow's thread pools are fixed at start-up."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    import numpy as np

    import keras
    from hvd_largebatch.tf import LARS
    from hvd_largebatch.tf.conadv import ConAdv
    from hvd_largebatch.tf.dual_bn import convert_to_dual_bn
    from hvd_largebatch.bench.keras_model import mnist1d_convnet

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 40)).astype("float32")
    y = rng.integers(0, 10, size=batch)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def compiled(model):
        model.compile(optimizer=LARS(learning_rate=0.1, momentum=0.9, weight_decay=5e-4), loss=loss, jit_compile=False)
        return model

    settings = dict(epsilon=EPSILON, step_size=EPSILON, input_range=None, seed=0)
    models = {
        "clean": compiled(mnist1d_convnet(seed=0)),
        "conadv_tau0": compiled(ConAdv(convert_to_dual_bn(mnist1d_convnet(seed=0)), staleness=0, **settings)),
        "conadv_tau1": compiled(ConAdv(convert_to_dual_bn(mnist1d_convnet(seed=0)), staleness=1, **settings)),
    }
    steppers = {name: (lambda m=model: m.train_on_batch(x, y)) for name, model in models.items()}
    return interleaved(steppers, steps, rounds)


def keras_measure(batch: int, steps: int, rounds: int, inter_op: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--keras-worker", str(inter_op), "--batch", str(batch),
           "--steps", str(steps), "--rounds", str(rounds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- report
def print_torch(threads: int, ms: dict[str, float]) -> None:
    clean = ms["clean"]
    print(f"\nPyTorch, {threads} intra-op thread(s): ms/step (ratio to clean)")
    for name in VARIANTS:
        print(f"  {name:<12} {ms[name]:8.2f}  ({ms[name] / clean:4.2f}x)")
    print("  split of the adversarial step:")
    for name in PARTS:
        print(f"    {name:<20} {ms[name]:8.2f}  ({ms[name] / clean:4.2f}x clean step)")
    print(f"  ConAdv step without the attack (the floor):  {ms['free_attack']:8.2f}  ({ms['free_attack'] / clean:4.2f}x)")
    attack_in_step = ms["sequential"] - ms["free_attack"]
    saved = ms["sequential"] - ms["concurrent"]
    print(f"  attack inside the sequential step (sequential - floor): {attack_in_step:.2f} ms; "
          f"concurrency saves {saved:.2f} ms = {saved / attack_in_step:.0%} of it hidden; "
          f"adversarial overhead over clean: sequential {ms['sequential'] - clean:.2f} ms, "
          f"concurrent {ms['concurrent'] - clean:.2f} ms")


def print_keras(inter_op: int, ms: dict[str, float]) -> None:
    clean = ms["clean"]
    branches = "branches serialised" if inter_op == 1 else "attack branch may overlap the clean branch"
    print(f"\nKeras (TensorFlow), inter-op pool {inter_op} ({branches}), intra-op 1: ms/step (ratio to clean)")
    for name in ("clean", "conadv_tau0", "conadv_tau1"):
        print(f"  {name:<12} {ms[name]:8.2f}  ({ms[name] / clean:4.2f}x)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    if args.keras_worker is not None:
        print(json.dumps(keras_worker(batches[0], args.steps, args.rounds, args.keras_worker)))
        return
    for batch in batches:
        measure_batch(args, batch)


def measure_batch(args: argparse.Namespace, batch: int) -> None:
    print(f"\n=== ConAdv step time, bench model (MNIST1DConvNet, dual BN), batch {batch}, "
          f"{args.rounds} interleaved rounds of {args.steps} steps, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f} (the overlap needs an idle core: read the figures with it)")
    if args.framework in ("torch", "both"):
        for threads in [int(t) for t in args.threads.split(",")]:
            print_torch(threads, torch_measure(batch, args.steps, args.rounds, threads))
    if args.framework in ("keras", "both"):
        runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for _ in range(args.keras_repeats):  # alternate the two pool sizes, one process each
            for inter_op in (1, 2):
                runs[inter_op].append(keras_measure(batch, args.steps, args.rounds, inter_op))
        keras_results = {
            inter_op: {name: statistics.median(run[name] for run in measured) for name in measured[0]}
            for inter_op, measured in runs.items()
        }
        for inter_op, ms in keras_results.items():
            print_keras(inter_op, ms)
        serial, parallel = keras_results[1], keras_results[2]
        print("  time with inter-op 2 / time with inter-op 1: "
              + ", ".join(f"{name} {parallel[name] / serial[name]:.2f}x" for name in ("clean", "conadv_tau0", "conadv_tau1")))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
