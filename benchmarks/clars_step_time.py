"""Training-step time of CLARS with exact per-example norms against LARS, PyTorch and Keras side by side.

Usage::

    .venv/bin/python benchmarks/clars_step_time.py [--rounds 15] [--threads 1] [--frameworks torch,keras]
    .venv/bin/python benchmarks/clars_step_time.py --frameworks torch --profile   # PyTorch, piece by piece

Two networks, the same in both frameworks:

* the bench CNN: a 1-D CNN with BatchNorm on signals of length 40
  (Conv 1->16 k5, Conv 16->32 k3 s2, Conv 32->32 k3 s2, each with BatchNorm
  and ReLU, a 320->10 classifier), batch 128;
* a small ResNet-style 2-D CNN on 3x16x16 images: a 3x3 stem to 16 channels,
  two residual blocks at 16 channels, a strided block to 32 channels (with a
  1x1 projection), two residual blocks at 32 channels, global average
  pooling and a 32->10 classifier; every convolution followed by BatchNorm;
  batch 64.

For each, one training step (forward, backward, optimizer step) is timed
with LARS and with CLARS ``estimator="exact"`` measured three ways: the ghost
rules reusing the training pass (PyTorch ``CLARS.forward_backward``; Keras
``CLARSModel``, which reuses Keras's training forward because BatchNorm is
the only training-dependent layer of both networks), the ghost rules in a
separate pass (PyTorch ``add_grad_norms``), and the vmap /
``vectorized_map`` reference path for every tensor.
Steps run round-robin (one step of every setup per round) so that machine
noise hits all alike; the table gives medians of this one run and each
setup's ratio to LARS in the same framework. PyTorch times are process CPU
time (one intra-op thread: equal to wall time on an idle machine, less
inflated by other jobs on a shared one); Keras steps run ``train_on_batch``
and are timed in wall time (TensorFlow's inter-op pool would make CPU time
misleading), with TensorFlow limited to ``--threads`` intra- and inter-op
threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH_BATCH, RESNET_BATCH = 128, 64


# ----------------------------------------------------------------- PyTorch
def torch_networks():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.project = None
            if stride != 1 or cin != cout:
                self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.project is None else self.project(x)))

    class ResNetStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1), Block(32, 32, 1))
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    def bench_cnn():
        return nn.Sequential(
            nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 32, 3, stride=2, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 10, 10),
        )

    generator = torch.Generator().manual_seed(0)
    return {
        "bench CNN (1-D, BN)": (bench_cnn, torch.randn(BENCH_BATCH, 1, 40, generator=generator),
                                torch.randint(0, 10, (BENCH_BATCH,), generator=generator)),
        "ResNet-style 2-D CNN": (ResNetStyle, torch.randn(RESNET_BATCH, 3, 16, 16, generator=generator),
                                 torch.randint(0, 10, (RESNET_BATCH,), generator=generator)),
    }


def time_torch(rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    import torch
    import torch.nn.functional as F

    from hvd_largebatch.torch_impl import CLARS, LARS, per_example_grad_norms

    loss_fn = F.cross_entropy

    def lars_step(model, opt, x, y):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    def fused_step(model, opt, x, y):
        opt.zero_grad()
        opt.forward_backward(model, loss_fn, x, y)
        opt.step()

    def separate_step(model, opt, x, y):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.add_grad_norms(model, loss_fn, x, y)
        opt.step()

    def vmap_step(model, opt, x, y):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.set_grad_norms(per_example_grad_norms(model, loss_fn, x, y, method="vmap", chunk_size=32))
        opt.step()

    kinds = {
        "LARS": (LARS, lars_step),
        "CLARS exact, ghost, fused with the training pass": (CLARS, fused_step),
        "CLARS exact, ghost, separate pass": (CLARS, separate_step),
        "CLARS exact, vmap reference": (CLARS, vmap_step),
    }
    results = {}
    for network, (build, x, y) in torch_networks().items():
        setups = {}
        for name, (kind, step) in kinds.items():
            torch.manual_seed(0)
            model = build()
            setups[name] = (model, kind(model.named_parameters(), lr=0.1), step)
        samples = {name: [] for name in setups}
        for round_index in range(warmup + rounds):
            for name, (model, opt, step) in setups.items():
                start = time.process_time()
                step(model, opt, x, y)
                if round_index >= warmup:
                    samples[name].append(time.process_time() - start)
        results[network] = {name: statistics.median(values) for name, values in samples.items()}
    return results


def profile_torch(rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """Where a fused CLARS step's time goes, piece by piece, next to LARS's pieces (``--profile``).

    The pieces of ``CLARS.forward_backward`` are run one by one through the
    ghost-norm recorder, as the package runs them: the recording forward, the
    training backward, the per-example backward with statistics held
    constant (split into the norm rules, which run in hooks on the autograd
    nodes of the layer outputs, and the rest: the activation-only backward itself), the
    optimizer step; each a median of process CPU time, the two optimizers'
    steps alternating.
    """
    import torch
    import torch.nn.functional as F

    from hvd_largebatch.torch_impl import CLARS, LARS, ghost_norms

    clock = time.process_time
    rules = [0.0]
    measure = ghost_norms.GhostRecorder._measure

    def timed_rule(recorder, module, grad, result):
        start = clock()
        measure(recorder, module, grad, result)
        rules[0] += clock() - start

    results = {}
    for network, (build, x, y) in torch_networks().items():
        torch.manual_seed(0)
        lars_model, clars_model = build(), build()
        clars_model.load_state_dict(lars_model.state_dict())
        lars = LARS(lars_model.named_parameters(), lr=0.1)
        clars = CLARS(clars_model.named_parameters(), lr=0.1)
        params = [p for group in clars.param_groups for p in group["params"]]
        samples: dict[str, list[float]] = {}
        ghost_norms.GhostRecorder._measure = timed_rule
        try:
            for round_index in range(warmup + rounds):
                marks = [clock()]
                lars.zero_grad()
                loss = F.cross_entropy(lars_model(x), y)
                marks.append(clock())
                loss.backward()
                marks.append(clock())
                lars.step()
                marks.append(clock())
                clars.zero_grad()
                recorder = ghost_norms.GhostRecorder(clars_model, params)
                with recorder:
                    outputs = clars_model(x)
                marks.append(clock())
                F.cross_entropy(outputs, y).backward(retain_graph=True)
                marks.append(clock())
                rules[0] = 0.0
                squared = recorder.squared_norms(F.cross_entropy(outputs, y, reduction="sum"))
                sums = torch.stack([squared[id(p)] for p in params], 1).sqrt_().to(torch.float64).sum(0)
                marks.append(clock())
                clars.set_grad_norms(dict(zip(params, sums / x.shape[0])))
                clars.step()
                marks.append(clock())
                if round_index < warmup:
                    continue
                d = [b - a for a, b in zip(marks, marks[1:])]
                pieces = {
                    "LARS forward": d[0], "LARS backward": d[1], "LARS step": d[2], "LARS total": d[0] + d[1] + d[2],
                    "CLARS forward, recording": d[3], "CLARS training backward": d[4],
                    "CLARS per-example backward, without the rules": d[5] - rules[0],
                    "CLARS norm rules (in autograd node hooks)": rules[0], "CLARS step": d[6],
                    "CLARS total": d[3] + d[4] + d[5] + d[6],
                }
                for name, value in pieces.items():
                    samples.setdefault(name, []).append(value)
        finally:
            ghost_norms.GhostRecorder._measure = measure
        results[network] = {name: statistics.median(values) for name, values in samples.items()}
    return results


# ------------------------------------------------------------------- Keras
def keras_networks():
    import keras
    import numpy as np

    layers = keras.layers

    def conv_bn(x, filters, kernel, stride=1):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)

    def block(x, filters, stride):
        shortcut = x
        out = layers.Activation("relu")(conv_bn(x, filters, 3, stride))
        out = conv_bn(out, filters, 3)
        if stride != 1 or x.shape[-1] != filters:
            shortcut = conv_bn(x, filters, 1, stride)
        return layers.Activation("relu")(layers.Add()([out, shortcut]))

    def resnet_style():
        inputs = keras.Input((16, 16, 3))
        x = layers.Activation("relu")(conv_bn(inputs, 16, 3))
        for filters, stride in ((16, 1), (16, 1), (32, 2), (32, 1), (32, 1)):
            x = block(x, filters, stride)
        x = layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, layers.Dense(10)(x))

    def bench_cnn():
        inputs = keras.Input((40, 1))
        x = inputs
        for filters, kernel, stride in ((16, 5, 1), (32, 3, 2), (32, 3, 2)):
            x = layers.Conv1D(filters, kernel, strides=stride, padding="same")(x)
            x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
            x = layers.Activation("relu")(x)
        x = layers.Flatten()(x)
        return keras.Model(inputs, layers.Dense(10)(x))

    rng = np.random.default_rng(0)
    return {
        "bench CNN (1-D, BN)": (bench_cnn, rng.normal(size=(BENCH_BATCH, 40, 1)).astype("float32"),
                                rng.integers(0, 10, size=BENCH_BATCH)),
        "ResNet-style 2-D CNN": (resnet_style, rng.normal(size=(RESNET_BATCH, 16, 16, 3)).astype("float32"),
                                 rng.integers(0, 10, size=RESNET_BATCH)),
    }


def time_keras(rounds: int, warmup: int, threads: int) -> dict[str, dict[str, float]]:
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from hvd_largebatch.tf import CLARS, LARS, CLARSModel

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kinds = {
        "LARS": None,
        "CLARS exact, ghost (CLARSModel)": "auto",
        "CLARS exact, vectorized_map reference": "vmap",
    }
    results = {}
    for network, (build, x, y) in keras_networks().items():
        setups = {}
        for name, method in kinds.items():
            keras.utils.set_random_seed(0)
            if method is None:
                model = build()
                model.compile(optimizer=LARS(learning_rate=0.1), loss=loss, jit_compile=False)
            else:
                model = CLARSModel(build(), method=method)
                model.compile(optimizer=CLARS(learning_rate=0.1), loss=loss, jit_compile=False)
            setups[name] = model
        samples = {name: [] for name in setups}
        for round_index in range(warmup + rounds):
            for name, model in setups.items():
                start = time.perf_counter()
                model.train_on_batch(x, y)
                if round_index >= warmup:
                    samples[name].append(time.perf_counter() - start)
        results[network] = {name: statistics.median(values) for name, values in samples.items()}
    return results


def print_table(framework: str, clock: str, results: dict[str, dict[str, float]]) -> None:
    for network, times in results.items():
        base = times["LARS"]
        print(f"{framework}, {network}: median ms per training step ({clock}), ratio to LARS")
        for name, seconds in times.items():
            print(f"  {name:<50} {seconds * 1e3:9.2f} {seconds / base:7.2f}x")


def main() -> None:
    global BENCH_BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per setup (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setup first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--frameworks", default="torch,keras", help="comma-separated: torch, keras")
    parser.add_argument("--profile", action="store_true",
                        help="PyTorch only: where a fused CLARS step's time goes, piece by piece, next to LARS's pieces")
    parser.add_argument("--bench-batch", type=int, default=BENCH_BATCH,
                        help=f"batch of the bench CNN (default {BENCH_BATCH}; the bench study's cells use 64-4096)")
    args = parser.parse_args()
    BENCH_BATCH = args.bench_batch
    frameworks = args.frameworks.split(",")
    print(f"CLARS exact vs LARS, one training step; {args.rounds} rounds after {args.warmup} warm-up, "
          f"{args.threads} thread(s), bench CNN batch {BENCH_BATCH}; load average {os.getloadavg()[0]:.1f}")
    if "torch" in frameworks:
        import torch

        torch.set_num_threads(args.threads)
        if args.profile:
            for network, times in profile_torch(args.rounds, args.warmup).items():
                base = times["LARS total"]
                print(f"PyTorch, {network}: median ms per piece (process CPU time), share of a LARS step")
                for name, seconds in times.items():
                    print(f"  {name:<50} {seconds * 1e3:9.2f} {seconds / base:7.2f}x")
        else:
            print_table("PyTorch", "process CPU time", time_torch(args.rounds, args.warmup))
    if "keras" in frameworks:
        print_table("Keras", "wall time", time_keras(args.rounds, args.warmup, args.threads))


if __name__ == "__main__":
    main()
