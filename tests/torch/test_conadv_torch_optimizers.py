"""ConAdv (PyTorch) trains with every optimizer of the package (CLARS fed the clean batch's norms)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hvd_largebatch.config import OPTIMIZER_NAMES
from hvd_largebatch.torch_impl import create_optimizer
from hvd_largebatch.torch_impl.conadv import ConAdv
from hvd_largebatch.torch_impl.dual_bn import convert_to_dual_bn

torch.set_num_threads(1)

SETTINGS = {
    "sgd": dict(lr=0.05),
    "lars": dict(lr=1.0, trust_coefficient=0.02),
    "larc": dict(lr=1.0, trust_coefficient=0.02),
    "clars": dict(lr=1.0, trust_coefficient=0.02, estimator="microbatch:4"),
    "lamb": dict(lr=0.01, weight_decay=0.0),
}


def test_the_table_covers_every_optimizer():
    assert set(SETTINGS) == set(OPTIMIZER_NAMES)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_conadv_trains_with_every_optimizer(name):
    torch.manual_seed(0)
    model = convert_to_dual_bn(
        nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    )
    opt = create_optimizer(name, model.named_parameters(), **SETTINGS[name])
    gen = torch.Generator().manual_seed(0)
    templates = torch.rand(4, 1, 16, generator=gen) * 2 - 1
    y_all = torch.randint(0, 4, (128,), generator=gen)
    x_all = (templates[y_all] + 0.3 * torch.randn(128, 1, 16, generator=gen)).clamp(-1, 1)
    batches = [(x_all[i:i + 32], y_all[i:i + 32]) for i in range(0, 128, 32)]

    def clean_loss():
        model.eval()
        with torch.no_grad():
            value = float(F.cross_entropy(model(x_all), y_all))
        model.train()
        return value

    before = clean_loss()
    with ConAdv(model, epsilon=0.1, step_size=0.1, seed=0) as conadv:
        for _ in range(4):
            for (x, y), ahead in conadv.lookahead(batches):
                opt.zero_grad()
                conadv.loss(x, y, ahead).backward()
                if name == "clars":
                    opt.add_grad_norms(model, F.cross_entropy, x, y)  # clean batch's per-example norms
                opt.step()
    after = clean_loss()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert opt.skipped_steps == 0
    assert after < 0.8 * before, (before, after)
