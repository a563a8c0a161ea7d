"""LARS with a poly schedule trains a tiny 1-D CNN with BatchNorm on MNIST-1D to >= 85% test accuracy.

MNIST-1D is generated in-process by the ``mnist1d`` package (4,000 samples:
3,200 train / 800 test; nothing is downloaded). 15 epochs at batch 128 take
a few seconds on one core; measured: 92.8% test accuracy (chance is 10%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mnist1d.data import get_dataset_args, make_dataset

from hvd_largebatch import schedules
from hvd_largebatch.torch_impl import LARS, GradualWarmupScheduler

REQUIRED_ACCURACY = 0.85


def _tiny_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 16, 5, padding=2), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        torch.nn.Conv1d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
        torch.nn.Conv1d(32, 32, 3, stride=2, padding=1), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 10, 10),
    )


def test_lars_trains_a_tiny_cnn_on_mnist1d():
    args = get_dataset_args()
    args.num_samples = 4000
    data = make_dataset(args)
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data["y"])
    x_test = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    y_test = torch.tensor(data["y_test"])

    torch.manual_seed(0)
    model = _tiny_cnn()
    batch, epochs, lr = 128, 15, 10.0
    steps_per_epoch = len(x) // batch
    opt = LARS(model.named_parameters(), lr=lr, weight_decay=5e-4)
    sched = GradualWarmupScheduler(
        opt, schedules.lars_poly(lr, batch, batch, steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=2)
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        model.train()
        for i in range(steps_per_epoch):
            index = order[i * batch:(i + 1) * batch]
            opt.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= REQUIRED_ACCURACY, f"test accuracy {accuracy:.3f} < {REQUIRED_ACCURACY}"
    assert opt.skipped_steps == 0
