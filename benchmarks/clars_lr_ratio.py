"""How much smaller a CLARS step is than a LARS step at the same LR: ``s / ||g||`` per tensor, measured.

Usage::

    .venv/bin/python benchmarks/clars_lr_ratio.py [--batch 1024] [--steps 200] [--at 0,20,100,200]

LARS's trust ratio divides by the norm of the batch gradient ``g = (1/B) sum_i g_i``;
CLARS's divides by ``s = (1/B) sum_i ||g_i||``, the mean per-example gradient norm
(docs/algorithms.md, "CLARS"). At the same LR and trust coefficient, an adapted
tensor's CLARS step is therefore ``||g|| / s`` times its LARS step, and
``ratio = s / ||g||`` (>= 1 by the triangle inequality) is the factor by which
CLARS's LR (or trust coefficient) must grow to take LARS's step. This script
measures ``ratio`` for every tensor of the bench CNN on one MNIST-1D batch of
``--batch`` examples, on the model at initialisation and after training it with
the bench's LARS recipe (sqrt scaling of base LR 8 from batch 128, gradual warmup
over 10% of ``--steps``, poly(2) decay) for the steps listed in ``--at``. One
process, one thread, exact per-example norms (``per_example_grad_norms``).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

from hvd_largebatch import schedules
from hvd_largebatch.bench.data import epoch_permutation, load_mnist1d
from hvd_largebatch.bench.torch_model import MNIST1DConvNet
from hvd_largebatch.torch_impl import LARS, per_example_grad_norms


def ratios(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{name: s / ||g||}`` of every parameter on the batch ``(x, y)`` (train-mode BatchNorm)."""
    s = per_example_grad_norms(model, F.cross_entropy, x, y, average_across_workers=False)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {name: float(s[name]) / float(p.grad.norm()) for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="global batch (default 1024)")
    parser.add_argument("--steps", type=int, default=200, help="LARS schedule length (default 200)")
    parser.add_argument("--at", default="0,20,100,200", help="steps at which to measure (default 0,20,100,200)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    at = sorted({int(v) for v in args.at.split(",")})
    data = load_mnist1d()
    x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    model = MNIST1DConvNet()
    schedule = schedules.make_schedule(8.0, args.steps, base_batch=128, global_batch=args.batch, scaling="sqrt",
                                       warmup_steps=args.steps // 10, decay="poly")
    opt = LARS(model.named_parameters(), lr=schedule(0), momentum=0.9, weight_decay=5e-4, trust_coefficient=0.001)
    adapted = {name for name, p in model.named_parameters() if p.ndim > 1}
    per_epoch = len(x_all) // args.batch
    print(f"s/||g|| on the bench CNN, batch {args.batch}, LARS peak LR {schedule.peak:.4g}; "
          f"load average {os.getloadavg()[0]:.1f}")
    for step in range(max(at) + 1):
        epoch, index = divmod(step, per_epoch)
        rows = epoch_permutation(len(x_all), epoch, seed=args.seed)[index * args.batch : (index + 1) * args.batch]
        x, y = x_all[rows], y_all[rows]
        if step in at:
            measured = ratios(model, x, y)
            median = statistics.median(measured[name] for name in adapted)
            cells = ", ".join(f"{name} {value:.1f}{'' if name in adapted else '*'}" for name, value in measured.items())
            print(f"step {step:4d}: median over adapted tensors {median:.1f}; {cells}")
        if step == max(at):
            break
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    print("* not adapted (ndim <= 1: biases, BatchNorm): plain momentum SGD at the LR in both optimizers")


if __name__ == "__main__":
    main()
