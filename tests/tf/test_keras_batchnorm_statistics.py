"""BatchNorm statistics averaging, the parts that need no second rank.

Which variables are averaged (nested models and both halves of a
DualBatchNormalization included), the refusals, and when the callback
averages within ``fit``: after the epoch's last training batch, before the
validation and the ``on_epoch_end`` callbacks (at ``on_epoch_end`` when the
steps per epoch are unknown). The averaging over ranks itself runs under
``horovodrun`` in tests/parallel/test_keras_parallel.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from hvd_largebatch.errors import HorovodNotInitialisedError
from hvd_largebatch.tf import AverageBatchNormStatistics, DualBatchNormalization, batchnorm_moving_statistics
import hvd_largebatch.tf.batchnorm_statistics as bn_module


def bn_model() -> keras.Model:
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn_inner")],
                             name="block")
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="bn_outer")(x)
    x = inner(x)
    x = DualBatchNormalization(name="dual")(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(x), name="net")


def test_every_batchnorm_statistic_is_found_in_a_fixed_order():
    paths = [v.path for v in batchnorm_moving_statistics(bn_model())]
    assert paths == [
        "bn_outer/moving_mean", "bn_outer/moving_variance",
        "block/bn_inner/moving_mean", "block/bn_inner/moving_variance",
        "dual/auxiliary/moving_mean", "dual/auxiliary/moving_variance",
        "dual/main/moving_mean", "dual/main/moving_variance",
    ]


def test_averaging_without_horovod_initialised_says_so(monkeypatch):
    import horovod.tensorflow as hvd

    monkeypatch.setattr(hvd, "is_initialized", lambda: False)  # as in a process that never called hvd.init()
    with pytest.raises(HorovodNotInitialisedError, match=r"call horovod.tensorflow.init\(\)"):
        bn_module.average_batchnorm_statistics(bn_model())


def test_the_callback_refuses_a_model_without_batchnorm():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)], name="plain")
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"^AverageBatchNormStatistics needs a model with BatchNormalization layers; "
                                         r"plain has none$"):
        model.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0, callbacks=[AverageBatchNormStatistics()])


class Events(keras.callbacks.Callback):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def on_test_begin(self, logs=None):
        self.events.append("validation")

    def on_epoch_end(self, epoch, logs=None):
        self.events.append("epoch_end")


@pytest.mark.parametrize("known_steps", [True, False], ids=["steps-known", "steps-unknown"])
def test_the_callback_averages_after_the_last_batch_before_validation(monkeypatch, known_steps):
    events: list[str] = []

    def record(model):
        events.append("average")
        return len(batchnorm_moving_statistics(model))

    monkeypatch.setattr(bn_module, "average_batchnorm_statistics", record)
    model = bn_model()
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((12, 3), dtype="float32"), np.ones((12, 1), dtype="float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    if not known_steps:  # a filtered dataset has unknown cardinality: fit learns the steps only at the end
        data = data.filter(lambda features, target: True)
    callback = AverageBatchNormStatistics()
    model.fit(data, epochs=2, validation_data=(x[:4], y[:4]), verbose=0,
              callbacks=[callback, Events(events)])
    per_epoch = ["average", "validation", "epoch_end"] if known_steps else ["validation", "average", "epoch_end"]
    assert events == per_epoch * 2
    assert callback.averaged_epochs == 2
