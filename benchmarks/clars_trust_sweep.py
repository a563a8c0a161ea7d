"""CLARS at LARS's LR with a larger trust coefficient, against LARS: test accuracy after a fixed number of steps.

Usage::

    .venv/bin/python benchmarks/clars_trust_sweep.py [--batch 1024] [--steps 200] [--trust 1,4,16] [--seed 0]

Raising CLARS's LR by the factor ``r = s / ||g||`` (benchmarks/clars_lr_ratio.py)
also raises the plain momentum-SGD step of the tensors that are not adapted
(biases, BatchNorm), which then diverge; raising the trust coefficient by ``r``
gives the adapted tensors exactly the same step as raising the LR (the step is
``lr * eta * ||w|| / (s + beta ||w||) * d``) and leaves the others at LARS's LR.
This script trains the bench CNN on MNIST-1D in one process (one thread) with
the bench's LARS recipe (base LR 8 at batch 128, sqrt scaling, gradual warmup
over 10% of ``--steps``, poly(2) decay; trust coefficient 0.001, momentum 0.9,
weight decay 5e-4) and with CLARS at the same LR and hyperparameters, no
warmup (the bench's CLARS recipe), the trust coefficient multiplied by each
``--trust`` factor; exact per-example norms through ``CLARS.forward_backward``.
It prints the test accuracy after ``--steps`` steps and each run's process CPU
time per step relative to LARS's.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from hvd_largebatch import schedules
from hvd_largebatch.bench.data import epoch_permutation, load_mnist1d
from hvd_largebatch.bench.torch_model import MNIST1DConvNet
from hvd_largebatch.torch_impl import CLARS, LARS

TRUST = 0.001
ARGS = {"momentum": 0.9, "weight_decay": 5e-4}


def train(kind: str, trust_factor: float, args: argparse.Namespace, data) -> tuple[float, float, int]:
    """``(test accuracy, CPU seconds per step, skipped steps)`` of one run."""
    torch.manual_seed(args.seed)
    model = MNIST1DConvNet()
    warmup = args.steps // 10 if kind == "lars" else 0
    schedule = schedules.make_schedule(8.0, args.steps, base_batch=128, global_batch=args.batch, scaling="sqrt",
                                       warmup_steps=warmup, decay="poly")
    optimizer_class = LARS if kind == "lars" else CLARS
    opt = optimizer_class(model.named_parameters(), lr=schedule(0), trust_coefficient=TRUST * trust_factor, **ARGS)
    x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    per_epoch = len(x_all) // args.batch
    cpu = 0.0
    for step in range(args.steps):
        epoch, index = divmod(step, per_epoch)
        rows = epoch_permutation(len(x_all), epoch, seed=args.seed)[index * args.batch : (index + 1) * args.batch]
        x, y = x_all[rows], y_all[rows]
        start = time.process_time()
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        opt.zero_grad()
        if kind == "lars":
            F.cross_entropy(model(x), y).backward()
        else:
            opt.forward_backward(model, F.cross_entropy, x, y)
        opt.step()
        cpu += time.process_time() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(data.x_test)).argmax(1) == torch.from_numpy(data.y_test)).float().mean()
    skipped = int(getattr(opt, "skipped_steps", 0))
    return float(accuracy), cpu / args.steps, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="global batch (default 1024)")
    parser.add_argument("--steps", type=int, default=200, help="training steps = schedule length (default 200)")
    parser.add_argument("--trust", default="1,4,16", help="CLARS trust-coefficient factors (default 1,4,16)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_mnist1d()
    print(f"bench CNN on MNIST-1D, batch {args.batch}, {args.steps} steps, seed {args.seed}, 1 thread; "
          f"load average {os.getloadavg()[0]:.1f}")
    accuracy, lars_cpu, _ = train("lars", 1.0, args, data)
    print(f"LARS  trust {TRUST:g}: test accuracy {accuracy:.2%}, CPU time per step 1.00x")
    for factor in (float(v) for v in args.trust.split(",")):
        accuracy, cpu, skipped = train("clars", factor, args, data)
        print(f"CLARS trust {TRUST * factor:g} ({factor:g}x): test accuracy {accuracy:.2%}, "
              f"CPU time per step {cpu / lars_cpu:.2f}x, skipped steps {skipped}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
