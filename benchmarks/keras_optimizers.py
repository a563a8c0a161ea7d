"""Update-step time of the Keras optimizers on ResNet-50's parameter shapes (a benchmark, not a test).

Measures one ``optimizer.apply(grads, variables)`` inside a ``tf.function``
(as under ``model.fit``) on float32 variables with ResNet-50's 161 parameter
tensors (25,557,032 scalars; torchvision's layout: convolutions without bias,
BatchNorm scale and offset, the 2048x1000 classifier), random gradients.
Every optimizer gets its own copy of the variables; the optimizers are timed
in turn, round after round, so that they share the machine's noise, and the
table reports medians from this one run and their ratios.

Targets (issue 4): our LARS <= 1.45x ``keras.optimizers.SGD(momentum=0.9)``;
our LAMB no slower than ``keras.optimizers.Lamb``. Our optimizers run with
their default ``fused=True`` (TensorFlow's single-pass norm and momentum
kernels, see ``hvd_largebatch.tf.fused_kernels``); the ``keras.ops only`` rows
show the same updates with ``fused=False``. "wd" rows add (coupled) weight
decay, which Keras's SGD in this comparison does not do.

Run: ``.venv/bin/python benchmarks/keras_optimizers.py [--rounds 30]``.
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


OPTIMIZERS = {
    "keras SGD(momentum=0.9)": lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
    "keras Adam": lambda: keras.optimizers.Adam(learning_rate=1e-3),
    "keras Lamb": lambda: keras.optimizers.Lamb(learning_rate=1e-3),
    "ours SGD": lambda: SGD(learning_rate=0.1, momentum=0.9),
    "ours LARS": lambda: LARS(learning_rate=0.1, momentum=0.9),
    "ours LARS wd=5e-4": lambda: LARS(learning_rate=0.1, momentum=0.9, weight_decay=5e-4),
    "ours LARC wd=5e-4": lambda: LARS(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, clip=True),
    "ours LAMB (wd=0.01)": lambda: LAMB(learning_rate=1e-3),
    "ours LAMB wd=0": lambda: LAMB(learning_rate=1e-3, weight_decay=0.0),
    "ours LARS keras.ops only": lambda: LARS(learning_rate=0.1, momentum=0.9, fused=False),
    "ours LARS wd=5e-4 keras.ops only": lambda: LARS(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, fused=False),
    "ours LAMB (wd=0.01) keras.ops only": lambda: LAMB(learning_rate=1e-3, fused=False),
}


BASELINES = ("keras SGD(momentum=0.9)", "keras Lamb")


def make_step(optimizer, shapes, rng):
    names = tensor_names(shapes)
    variables = [
        keras.Variable(rng.standard_normal(s, dtype=np.float32) * 0.05, name=n) for s, n in zip(shapes, names)
    ]
    grads = [tf.constant(rng.standard_normal(s, dtype=np.float32) * 1e-3) for s in shapes]
    optimizer.build(variables)

    @tf.function(jit_compile=False)
    def step(grads):
        optimizer.apply(grads, variables)
        return optimizer.iterations

    return lambda: step(grads).numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per optimizer (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per optimizer first (default 3)")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="TensorFlow intra-op threads (default 0: TensorFlow's choice, all cores); 1 is steadier on a busy machine",
    )
    parser.add_argument("--only", nargs="*", default=None, help="names (substrings) of the optimizers to time")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1 or args.threads < 0:
        parser.error("--rounds and --warmup must be >= 1, --threads >= 0")
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    shapes = resnet50_parameter_shapes()
    rng = np.random.default_rng(0)
    chosen = {
        name: factory for name, factory in OPTIMIZERS.items()
        if args.only is None or name in BASELINES or any(word in name for word in args.only)
    }
    steps = {name: make_step(factory(), shapes, rng) for name, factory in chosen.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    quartile = {name: statistics.quantiles(t, n=4)[0] * 1e3 if len(t) > 1 else t[0] * 1e3 for name, t in times.items()}
    sgd, lamb = median["keras SGD(momentum=0.9)"], median["keras Lamb"]
    print(
        f"ResNet-50 shapes: {len(shapes)} tensors, {sum(math.prod(s) for s in shapes):,} float32 parameters; "
        f"{args.rounds} rounds; TF {tf.__version__}, Keras {keras.__version__}; "
        f"intra-op threads {args.threads or 'default'}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print()
    print("| optimizer | median step (ms) | 25th pct (ms) | median / keras SGD | median / keras Lamb |")
    print("|---|---:|---:|---:|---:|")
    for name, value in median.items():
        print(f"| {name} | {value:.1f} | {quartile[name]:.1f} | {value / sgd:.2f}x | {value / lamb:.2f}x |")
    print()
    for name, base, limit in (
        ("ours LARS", "keras SGD(momentum=0.9)", 1.45),
        ("ours LARS wd=5e-4", "keras SGD(momentum=0.9)", 1.45),
        ("ours LAMB (wd=0.01)", "keras Lamb", 1.0),
    ):
        if name in median:
            ratio = median[name] / median[base]
            print(f"target {name} <= {limit:.2f}x {base}: {ratio:.2f}x ({'met' if ratio <= limit else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
