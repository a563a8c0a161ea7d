"""LARS, LAMB and CLARS train the package's 1-D CNN with BatchNorm on MNIST-1D through ``model.fit``.

MNIST-1D is generated in-process by the ``mnist1d`` package (4,000 samples:
3,200 train / 800 test; nothing is downloaded). Each optimizer trains the
Keras model of :mod:`hvd_largebatch.bench.keras_model` for a few epochs at batch 128
with a schedule from the core, set per batch by the package's callback
(CLARS without warmup, as the paper runs it, through :class:`CLARSModel`
with the ``microbatch:8`` estimator; ``exact`` is checked against a loop in
test_keras_clars.py and is several times slower here). Chance is 10%;
measured test accuracy: LARS 95.0%, LAMB 95.4%, CLARS 91.1% (about 5 s each).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from mnist1d.data import get_dataset_args, make_dataset

from hvd_largebatch import schedules
from hvd_largebatch.tf import CLARS, LAMB, LARS, CLARSModel, callbacks
from hvd_largebatch.bench.keras_model import mnist1d_convnet

BATCH, EPOCHS = 128, 12
REQUIRED_ACCURACY = 0.80


@pytest.fixture(scope="module")
def mnist1d():
    args = get_dataset_args()
    args.num_samples = 4000
    data = make_dataset(args)
    return (data["x"].astype("float32"), data["y"]), (data["x_test"].astype("float32"), data["y_test"])


def lars_schedule(base_lr, steps_per_epoch, warmup_epochs):
    return schedules.lars_poly(base_lr, BATCH, BATCH, steps_per_epoch=steps_per_epoch, epochs=EPOCHS,
                               warmup_epochs=warmup_epochs)


CASES = {
    "lars": (lambda: LARS(learning_rate=1.0, weight_decay=5e-4), 10.0, 2, False),
    "lamb": (lambda: LAMB(learning_rate=1.0, weight_decay=1e-2), 0.02, 2, False),
    # CLARS's denominator, the mean per-micro-batch norm, exceeds ||g||: it wants a larger base LR.
    "clars": (lambda: CLARS(learning_rate=1.0, weight_decay=5e-4, estimator="microbatch:8"), 20.0, 0, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_trains_the_cnn_on_mnist1d(mnist1d, name):
    (x, y), (x_test, y_test) = mnist1d
    factory, base_lr, warmup_epochs, wrap = CASES[name]
    keras.utils.set_random_seed(0)
    model = mnist1d_convnet(seed=0)
    if wrap:
        model = CLARSModel(model)
    model.compile(optimizer=factory(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    schedule = lars_schedule(base_lr, len(x) // BATCH, warmup_epochs)
    lr_callback = (callbacks.GradualWarmupCallback(schedule) if warmup_epochs
                   else callbacks.LearningRateScheduleCallback(schedule))
    # Whole batches only, so that every step has 128 examples; Keras reshuffles each epoch.
    usable = len(x) // BATCH * BATCH
    model.fit(x[:usable], y[:usable], batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=[lr_callback])
    _, accuracy = model.evaluate(x_test, y_test, batch_size=400, verbose=0)
    assert accuracy >= REQUIRED_ACCURACY, f"{name}: test accuracy {accuracy:.3f} < {REQUIRED_ACCURACY}"
    assert int(model.optimizer.skipped_steps.numpy()) == 0
    assert np.isfinite(model.optimizer.prev_learning_rate.numpy())
