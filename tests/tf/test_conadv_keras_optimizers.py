"""ConAdv (Keras) trains under fit with the package's optimizers and Keras's own; CLARS is refused clearly."""

import numpy as np
import pytest

import keras
from hvd_largebatch.config import OPTIMIZER_NAMES
from hvd_largebatch.tf import create_optimizer
from hvd_largebatch.tf.conadv import ConAdv
from hvd_largebatch.tf.dual_bn import convert_to_dual_bn

SETTINGS = {
    "sgd": dict(learning_rate=0.05),
    "lars": dict(learning_rate=1.0, trust_coefficient=0.02),
    "larc": dict(learning_rate=1.0, trust_coefficient=0.02),
    "lamb": dict(learning_rate=0.01, weight_decay=0.0),
}


def _data():
    rng = np.random.default_rng(0)
    templates = rng.uniform(-1, 1, size=(4, 16))
    y = rng.integers(0, 4, size=128)
    x = np.clip(templates[y] + 0.3 * rng.normal(size=(128, 16)), -1, 1).astype("float32")
    return x, y


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16,)), keras.layers.Reshape((16, 1)), keras.layers.Conv1D(8, 3, padding="same"),
            keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(4),
        ]
    )


def test_the_table_covers_every_optimizer_but_clars():
    assert set(SETTINGS) | {"clars"} == set(OPTIMIZER_NAMES)


@pytest.mark.parametrize("name", sorted(SETTINGS) + ["keras_adam"])
def test_conadv_trains_with_the_optimizer(name):
    x, y = _data()
    optimizer = keras.optimizers.Adam(0.01) if name == "keras_adam" else create_optimizer(name, **SETTINGS[name])
    model = ConAdv(convert_to_dual_bn(_model()), epsilon=0.1, step_size=0.1, seed=0)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    assert after < 0.8 * before, (before, after)


def test_clars_is_refused_with_a_clear_error():
    x, y = _data()
    model = ConAdv(convert_to_dual_bn(_model()), epsilon=0.1, step_size=0.1)
    model.compile(optimizer=create_optimizer("clars"), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="ConAdv does not feed CLARS"):
        model.fit(x, y, batch_size=32, verbose=0)
