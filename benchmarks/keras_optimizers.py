"""Update-step time of the Keras optimizers on ResNet-50's parameter shapes, against the memory-bandwidth floor.

Measures one ``optimizer.apply(grads, variables)`` inside a ``tf.function``
(as under ``model.fit``) on float32 variables with ResNet-50's 161 parameter
tensors (25,557,032 scalars; torchvision's layout: convolutions without bias,
BatchNorm scale and offset, the 2048x1000 classifier), random gradients.
The gradients are captured by the traced function, not passed as its
arguments: under ``model.fit`` they are computed inside the training step's
function, and a ``tf.function`` call with 161 tensor arguments spends a few
ms per call in Python dispatch alone (as much as a pass over the
parameters; printed apart, as "tf.function call with 161 tensor arguments").
Every optimizer gets its own copy of the variables; the optimizers are timed
in turn, round after round, together with the floor, so that all share the
machine's noise; the table reports medians from this one run and their ratios.

The floor: an update must at least read and write its tensors once. One
*pass* (one read or one write of every parameter) is timed in the same rounds
as an in-place TensorFlow add of the same total size (``x += y`` on one flat
float32 variable: two reads and one write, so a pass is a third of it; an
out-of-place add would also time the page faults of a fresh 100 MB output).
An optimizer's floor is its pass count times that: the fewest passes its
rule needs, with the package's non-finite policy where the optimizer has it
(a step whose gradients hold NaN or Inf writes no weight and no slot, on
every rank, so every gradient is read once before anything is written):

* Keras SGD with momentum: read g, m, w; write m, w: 5 (coupled weight decay adds none);
* our SGD: 6, the 5 above after one read of g for the non-finite check;
* LARS/LARC: the momentum step's 5 after one read of w and g for the norms,
  which the non-finite check shares: 7;
* Keras Adam: read g, m, v, w; write m, v, w: 7;
* Keras Lamb: read g, mu, nu, w and write mu, nu, with ||w|| and ||u|| in the same pass (6),
  then read mu, nu, w and write w to apply the trust ratio (4): 10;
* our LAMB: 11, one more than Keras's: the check must read every g before
  the first pass may write the moments, and ||u|| needs all of a tensor's new
  moments before its w may be written, so either the first pass only reads
  (g, mu, nu, w: 4; then read g, mu, nu, w and write mu, nu, w: 7) or the
  check reads g alone first (1; then 6 and 4 as Keras's).

These are the counts of ``benchmarks/torch_optimizers.py`` for the same
rules: the two scripts' floors mean the same thing. What the count does not
see: with one thread, a pass that only reads (the norms, the check) costs
more than its count on this machine, and a write to memory just read less;
the in-place add has two reads to one write.

Our optimizers run with their default ``fused=True`` (TensorFlow's
single-pass norm and momentum kernels, the path of GPUs and XLA) and, in the
rows marked "native", with ``fused="native"``: the package's own CPU kernels
(``hvd_largebatch/tf/fused_kernels.cc``, see ``hvd_largebatch.tf.fused_kernels``;
built with the system C++ compiler on first use). With them every optimizer
takes exactly its floor's passes: SGD, LARS and LARC one read of g (and w)
for sum(g), ||g|| and ||w||, then one in-place momentum pass; LAMB a first
pass that only reads (g, mu, nu, w), then one that reads g again to
recompute the moments and writes mu, nu and w.
Rows marked "keras.ops only" run ``fused=False``. The pass counts of the table are the floors, for every row.
"wd" rows add coupled weight decay, which Keras's SGD does not do. The first
call of each optimizer (tracing, and on the first run on a machine the
build of the kernels) is timed apart and printed as its warm-up.

Times are the process's CPU time by default (``--clock process``): with one
thread that equals the wall time on an idle machine and stays meaningful on a
shared one (``--clock wall`` measures wall time instead).

Targets (issue 13): LARS and LAMB <= 1.3x their floor.

Run: ``.venv/bin/python benchmarks/keras_optimizers.py [--threads 1] [--rounds 30]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_largebatch.tf import LAMB, LARS, SGD  # noqa: E402

CLOCKS = {"process": time.process_time, "wall": time.perf_counter}


def resnet50_parameter_shapes() -> list[tuple[int, ...]]:
    """ResNet-50's trainable tensors in Keras layout (conv kernels HWIO), in network order.

    Stem: conv 7x7x3x64, bn(64). Four stages of bottleneck blocks (3, 4, 6, 3
    blocks; widths 64, 128, 256, 512; expansion 4), each block: conv 1x1
    (in -> width), bn, conv 3x3 (width -> width), bn, conv 1x1 (width -> 4 width),
    bn, and in the first block of a stage a projection conv 1x1 (in -> 4 width), bn.
    Head: dense 2048x1000 and its bias. Every bn is a scale and an offset.
    """
    shapes: list[tuple[int, ...]] = [(7, 7, 3, 64), (64,), (64,)]
    channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(1, 1, channels, width), (width,), (width,)]
            shapes += [(3, 3, width, width), (width,), (width,)]
            shapes += [(1, 1, width, 4 * width), (4 * width,), (4 * width,)]
            if block == 0:
                shapes += [(1, 1, channels, 4 * width), (4 * width,), (4 * width,)]
            channels = 4 * width
    shapes += [(2048, 1000), (1000,)]
    assert len(shapes) == 161 and sum(math.prod(s) for s in shapes) == 25_557_032
    return shapes


def tensor_names(shapes) -> list[str]:
    """Names the exclusion rules can read: vectors are BatchNorm/bias (excluded by the default ndim rule)."""
    return [f"t{i}_{'kernel' if len(s) > 1 else 'bn'}" for i, s in enumerate(shapes)]


#: name -> (factory, passes over the parameters of its floor).
OPTIMIZERS = {
    "keras SGD(momentum=0.9)": (lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9), 5),
    "keras Adam": (lambda: keras.optimizers.Adam(learning_rate=1e-3), 7),
    "keras Lamb": (lambda: keras.optimizers.Lamb(learning_rate=1e-3), 10),
    "ours SGD": (lambda: SGD(learning_rate=0.1, momentum=0.9), 6),
    "ours SGD native": (lambda: SGD(learning_rate=0.1, momentum=0.9, fused="native"), 6),
    "ours LARS": (lambda: LARS(learning_rate=0.1, momentum=0.9), 7),
    "ours LARS native": (lambda: LARS(learning_rate=0.1, momentum=0.9, fused="native"), 7),
    "ours LARS wd=5e-4 native": (lambda: LARS(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, fused="native"), 7),
    "ours LARC wd=5e-4 native": (
        lambda: LARS(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, clip=True, fused="native"), 7),
    "ours LAMB (wd=0.01)": (lambda: LAMB(learning_rate=1e-3), 11),
    "ours LAMB (wd=0.01) native": (lambda: LAMB(learning_rate=1e-3, fused="native"), 11),
    "ours LAMB wd=0 native": (lambda: LAMB(learning_rate=1e-3, weight_decay=0.0, fused="native"), 11),
    "ours LARS keras.ops only": (lambda: LARS(learning_rate=0.1, momentum=0.9, fused=False), 7),
    "ours LAMB (wd=0.01) keras.ops only": (lambda: LAMB(learning_rate=1e-3, fused=False), 11),
}

SGD_BASELINE = "keras SGD(momentum=0.9)"
BASELINES = (SGD_BASELINE,)
#: (row, target ratio to its floor) of issue 13.
TARGETS = tuple((row, 1.3) for row in ("ours LARS", "ours LAMB (wd=0.01)", "ours LARS native",
                                        "ours LARS wd=5e-4 native", "ours LAMB (wd=0.01) native"))


def make_step(optimizer, shapes, rng):
    """One ``optimizer.apply`` in a ``tf.function`` that captures its gradients (as a training step computes them)."""
    names = tensor_names(shapes)
    variables = [
        keras.Variable(rng.standard_normal(s, dtype=np.float32) * 0.05, name=n) for s, n in zip(shapes, names)
    ]
    grads = [tf.constant(rng.standard_normal(s, dtype=np.float32) * 1e-3) for s in shapes]
    optimizer.build(variables)

    @tf.function(jit_compile=False)
    def step():
        optimizer.apply(grads, variables)
        return optimizer.iterations

    return lambda: step().numpy()


def make_argument_dispatch(shapes, rng):
    """A ``tf.function`` that takes 161 gradient-sized tensors as arguments and only reads one scalar of them."""
    grads = [tf.constant(rng.standard_normal(s, dtype=np.float32)) for s in shapes]

    @tf.function(jit_compile=False)
    def call(grads):
        return tf.reshape(grads[0], [-1])[0]

    return lambda: call(grads).numpy()


def make_floor_add(total: int, rng):
    """An in-place add ``x += y`` over ``total`` float32 scalars: 3 passes (read x, y; write x)."""
    x = tf.Variable(rng.standard_normal(total, dtype=np.float32))
    y = tf.constant(rng.standard_normal(total, dtype=np.float32))

    @tf.function(jit_compile=False)
    def add():
        x.assign_add(y)
        return x[0]

    return lambda: add().numpy()


FLOOR = "floor: in-place add x += y"
DISPATCH = "tf.function call with 161 tensor arguments"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per optimizer (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per optimizer after the first (default 3)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="TensorFlow intra-op threads (default 1, steadiest on a busy machine; 0: TensorFlow's choice)",
    )
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process", help="process CPU time or wall time")
    parser.add_argument("--only", nargs="*", default=None, help="names (substrings) of the optimizers to time")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.warmup < 0 or args.threads < 0:
        parser.error("--rounds must be >= 2, --warmup >= 0, --threads >= 0")
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    clock = CLOCKS[args.clock]

    shapes = resnet50_parameter_shapes()
    total = sum(math.prod(s) for s in shapes)
    rng = np.random.default_rng(0)
    chosen = {
        name: entry for name, entry in OPTIMIZERS.items()
        if args.only is None or name in BASELINES or any(word in name for word in args.only)
    }
    passes = {name: count for name, (_, count) in chosen.items()}
    steps = {FLOOR: make_floor_add(total, rng), DISPATCH: make_argument_dispatch(shapes, rng)}
    steps.update({name: make_step(factory(), shapes, rng) for name, (factory, _) in chosen.items()})
    first_call = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        first_call[name] = time.perf_counter() - start
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)

    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    quartile = {name: statistics.quantiles(t, n=4)[0] * 1e3 for name, t in times.items()}
    one_pass = median[FLOOR] / 3
    sgd = median[SGD_BASELINE]
    print(
        f"ResNet-50 shapes: {len(shapes)} tensors, {total:,} float32 parameters; {args.rounds} rounds, "
        f"{args.clock} time; TF {tf.__version__}, Keras {keras.__version__}; "
        f"intra-op threads {args.threads or 'default'}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print(
        f"one pass over the parameters: {one_pass:.2f} ms (in-place add of {total:,} float32 = 3 passes: "
        f"{median[FLOOR]:.1f} ms, 25th pct {quartile[FLOOR]:.1f} ms)"
    )
    print(
        f"not in the steps below: a {DISPATCH} (what passing the gradients from Python would add to every step): "
        f"{median[DISPATCH]:.2f} ms"
    )
    print()
    print("| optimizer | median step (ms) | 25th pct (ms) | passes | floor (ms) | median / floor | median / keras SGD "
          "| first call (s, wall) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in chosen:
        value, floor = median[name], passes[name] * one_pass
        print(
            f"| {name} | {value:.1f} | {quartile[name]:.1f} | {passes[name]} | {floor:.1f} | {value / floor:.2f}x "
            f"| {value / sgd:.2f}x | {first_call[name]:.1f} |"
        )
    print()
    print("first call: tracing (once per process and variable list)")
    for name, limit in TARGETS:
        if name in median:
            ratio = median[name] / (passes[name] * one_pass)
            print(f"target {name} <= {limit:.2f}x its floor: {ratio:.2f}x ({'met' if ratio <= limit else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
