"""A small MNIST-1D run: the Keras ConAdv wrapper + LARS trains the bench model at a large batch under fit.

Same setting as the PyTorch test (bench recipe ``conadv`` at global batch 800
on 3,200 signals, 12 epochs; ConAdv with epsilon 0.1 and ``average_losses``):
ConAdv + LARS must train (test accuracy far above chance), with
``model.fit`` and ``model.evaluate`` used as usual.
"""

import numpy as np
from mnist1d.data import get_dataset_args, make_dataset

import keras
from hvd_largebatch.bench.recipes import CONADV_ARGS, METHODS, plan_cell
from hvd_largebatch.tf import LARS, ScheduleAdapter
from hvd_largebatch.tf.conadv import ConAdv
from hvd_largebatch.bench.keras_model import mnist1d_convnet
from hvd_largebatch.tf.dual_bn import convert_to_dual_bn

BATCH, EPOCHS, SAMPLES = 800, 12, 4000
CONADV = {**CONADV_ARGS, "epsilon": 0.1, "step_size": 0.1, "average_losses": True}


def test_conadv_with_lars_trains_mnist1d_at_a_large_batch_under_fit():
    args = get_dataset_args()
    args.num_samples, args.seed = SAMPLES, 42
    data = make_dataset(args)
    x_train, y_train = data["x"].astype("float32"), data["y"]
    x_test, y_test = data["x_test"].astype("float32"), data["y_test"]
    plan = plan_cell(METHODS["conadv"], framework="keras", global_batch=BATCH, world_size=1, epochs=EPOCHS,
                     train_size=len(x_train), seed=0)
    lars = plan.optimizer_config
    optimizer = LARS(
        learning_rate=ScheduleAdapter(plan.schedule), momentum=lars["momentum"], weight_decay=lars["weight_decay"],
        trust_coefficient=lars["trust_coefficient"], epsilon=lars["eps"],
    )
    model = ConAdv(convert_to_dual_bn(mnist1d_convnet(seed=0)), seed=0, **CONADV)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    keras.utils.set_random_seed(0)
    model.fit(x_train, y_train, batch_size=BATCH, epochs=EPOCHS, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"\nKeras MNIST-1D, batch {BATCH}, {EPOCHS} epochs: ConAdv+LARS test accuracy {accuracy:.3f}")
    assert accuracy > 0.65, accuracy
    assert int(model._step.numpy()) == EPOCHS * int(np.ceil(len(x_train) / BATCH))
