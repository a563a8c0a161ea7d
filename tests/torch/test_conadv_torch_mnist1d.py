"""A small MNIST-1D run: ConAdv + LARS trains the bench model at a large batch (PyTorch).

The optimizer and schedule are the bench's ``conadv`` recipe
(``hvd_largebatch.bench.recipes``: LARS, square-root LR scaling, gradual warmup,
poly(2) decay) at a global batch of 800 on 3,200 training signals: 4 steps
per epoch, 12 epochs. ConAdv uses the bench's settings (targeted, random
start 0.8, dual BN, staleness 1) except ``epsilon = step_size = 0.1`` and
``average_losses=True``: with the sum of the two losses LARS's raw global LR
on the tensors it does not adapt (BatchNorm, biases) is effectively doubled,
which on MNIST-1D cost about 20-30 points (figures in ``hvd_largebatch.torch_impl.conadv``).
The test asserts that ConAdv + LARS trains (test accuracy far above the 10% of
chance) and that evaluation uses the main BatchNorm; LARS alone is trained on
the same data and order for the record, not asserted against: runs this short
are noisy (seed-to-seed spread of several points), figures in the report.
"""

import torch
import torch.nn.functional as F
from mnist1d.data import get_dataset_args, make_dataset

from hvd_largebatch.bench.recipes import CONADV_ARGS, METHODS, plan_cell
from hvd_largebatch.torch_impl import GradualWarmupScheduler, create_optimizer
from hvd_largebatch.torch_impl.conadv import ConAdv
from hvd_largebatch.torch_impl.dual_bn import convert_to_dual_bn, dual_bn_layers
from hvd_largebatch.bench.torch_model import MNIST1DConvNet

BATCH, EPOCHS, SAMPLES = 800, 12, 4000
CONADV = {**CONADV_ARGS, "epsilon": 0.1, "step_size": 0.1, "average_losses": True}


def _data():
    args = get_dataset_args()
    args.num_samples, args.seed = SAMPLES, 42  # 80% train, 20% test
    data = make_dataset(args)
    as_float = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_float(data["x"]), torch.tensor(data["y"]), as_float(data["x_test"]), torch.tensor(data["y_test"])


def _train(method, x_train, y_train, x_test, y_test, seed=0):
    plan = plan_cell(METHODS[method], framework="torch", global_batch=BATCH, world_size=1, epochs=EPOCHS,
                     train_size=len(x_train), seed=seed)
    torch.manual_seed(seed)
    model = MNIST1DConvNet()
    if plan.conadv is not None:
        model = convert_to_dual_bn(model)
    arguments = {k: v for k, v in plan.optimizer_config.items() if k not in ("lr", "nonfinite")}
    opt = create_optimizer(plan.optimizer, model.named_parameters(), lr=plan.schedule(0), **arguments)
    scheduler = GradualWarmupScheduler(opt, plan.schedule)
    conadv = ConAdv(model, F.cross_entropy, seed=seed, **CONADV) if plan.conadv is not None else None
    order = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x_train), generator=order)
        batches = [(x_train[perm[i:i + BATCH]], y_train[perm[i:i + BATCH]]) for i in range(0, len(x_train), BATCH)]
        pairs = conadv.lookahead(batches) if conadv is not None else ((b, None) for b in batches)
        for (x, y), ahead in pairs:
            opt.zero_grad()
            loss = conadv.loss(x, y, ahead) if conadv is not None else F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            scheduler.step()
    if conadv is not None:
        conadv.close()
    model.eval()
    with torch.no_grad():
        return model, float((model(x_test).argmax(1) == y_test).double().mean())


def test_conadv_with_lars_trains_mnist1d_at_a_large_batch():
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = _data()
    assert len(x_train) // BATCH == 4  # a large batch for this data: 4 steps per epoch
    model, conadv_accuracy = _train("conadv", x_train, y_train, x_test, y_test)
    _, lars_accuracy = _train("lars", x_train, y_train, x_test, y_test)
    print(f"\nMNIST-1D, batch {BATCH}, {EPOCHS} epochs: ConAdv+LARS {conadv_accuracy:.3f}, LARS {lars_accuracy:.3f}")
    assert conadv_accuracy > 0.65, conadv_accuracy
    assert lars_accuracy > 0.65, lars_accuracy
    assert len(dual_bn_layers(model)) == 3 and not any(layer.use_auxiliary for layer in dual_bn_layers(model))
