"""Keras NoiseScaleMonitor on one rank (micro-batches are the small batches): exact, logged, harmless, validated.

The two-rank behaviour (one allreduce of the local norms, identical ranks) is
tested under horovodrun in tests/parallel/test_keras_parallel.py.
"""

from __future__ import annotations

import math

import horovod.tensorflow as hvd
import keras
import numpy as np
import pytest
import tensorflow as tf

from hvd_largebatch import noise_scale
from hvd_largebatch.tf import SGD, DistributedOptimizer, NoiseScaleMonitor
from hvd_largebatch.tf import horovod_backend

N, FEATURES, CLASSES = 8, 4, 3


@pytest.fixture(scope="module", autouse=True)
def horovod_one_rank():
    hvd.init()
    assert hvd.size() == 1
    yield


def model() -> keras.Model:
    keras.utils.set_random_seed(5)
    inputs = keras.Input((FEATURES,))
    x = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(x))


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(updates: int):
    rng = np.random.default_rng(9)
    return rng.normal(size=(updates * N, FEATURES)), rng.integers(0, CLASSES, size=updates * N)


class Exact(keras.callbacks.Callback):
    """Per update: the closed-form (G2, S), whole and per variable, from per-example gradients at the current weights."""

    def __init__(self, x, y, passes, micro_batch):
        super().__init__()
        self.x, self.y, self.passes, self.micro = x, y, passes, micro_batch
        self.rows = []

    def on_train_batch_begin(self, batch, logs=None):
        if batch % self.passes:
            return
        start = batch // self.passes * N
        per_example = []
        for i in range(start, start + N):
            with tf.GradientTape() as tape:
                value = loss()(self.y[i:i + 1], self.model(self.x[i:i + 1], training=True))
            per_example.append([g.numpy().reshape(-1) for g in tape.gradient(value, self.model.trainable_variables)])
        whole = np.stack([np.concatenate(r) for r in per_example])
        tensors = [np.stack([r[j] for r in per_example]) for j in range(len(per_example[0]))]
        self.rows.append((
            noise_scale.exact_estimates_from_per_example_gradients(whole, self.micro),
            [noise_scale.exact_estimates_from_per_example_gradients(t, self.micro) for t in tensors],
        ))


class Record(keras.callbacks.Callback):
    def __init__(self, monitor, passes):
        super().__init__()
        self.monitor, self.passes, self.rows = monitor, passes, []

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.passes == 0:
            m = self.monitor
            values = m.per_tensor_values() if m.per_tensor else {}
            self.rows.append((m.raw_g2, m.raw_s, values, m.last_small_sq_norms, m.last_big_sq_norms))


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
def test_estimates_equal_the_closed_form_and_reach_the_logs(float64, micro_batch):
    passes = N // micro_batch
    x, y = data(updates=3)
    net = model()
    net.compile(optimizer=DistributedOptimizer(SGD(learning_rate=0.5), backward_passes_per_step=passes,
                                               noise_scale_interval=1), loss=loss(), jit_compile=False)
    monitor = NoiseScaleMonitor(batch_size=micro_batch, ema_decay=0.0, per_tensor=True)
    exact, record = Exact(x, y, passes, micro_batch), Record(monitor, passes)
    history = net.fit(x, y, batch_size=micro_batch, epochs=1, shuffle=False, verbose=0,
                      callbacks=[exact, monitor, record])
    assert (monitor.estimator.small_batch, monitor.estimator.big_batch) == (micro_batch, N)
    assert len(record.rows) == len(exact.rows) == 3 and monitor.estimator.updates == 3
    for ((g2, s), per_tensor), (raw_g2, raw_s, values, _, _) in zip(exact.rows, record.rows):
        assert raw_g2 == pytest.approx(g2, rel=1e-10)
        assert raw_s == pytest.approx(s, rel=1e-10)
        for (tg2, ts), v in zip(per_tensor, values.values()):  # decay 0: the last estimates
            assert v["g2"] == pytest.approx(tg2, rel=1e-10, abs=1e-14)
            assert v["s"] == pytest.approx(ts, rel=1e-10, abs=1e-14)
    assert list(values) == [v.path for v in net.trainable_variables]
    logs = history.history
    assert logs["noise_scale_g2"] == [monitor.g2] and logs["noise_scale_s"] == [monitor.s]
    assert logs["b_simple"] == [monitor.b_simple] or math.isnan(monitor.b_simple)
    assert f"b_simple/{net.trainable_variables[0].path}" in logs


def test_ema_and_ratio_are_the_core_estimator_fed_the_measured_norms(float64):
    x, y = data(updates=5)
    net = model()
    net.compile(optimizer=DistributedOptimizer(SGD(learning_rate=0.3), backward_passes_per_step=4,
                                               noise_scale_interval=1), loss=loss(), jit_compile=False)
    monitor = NoiseScaleMonitor(batch_size=2, ema_decay=0.9)
    record = Record(monitor, 4)
    net.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, record])
    oracle = noise_scale.NoiseScaleEstimator(2, 8, ema_decay=0.9)
    for t, (_, _, _, small, big) in enumerate(record.rows):
        oracle.update(small, big, t)
    assert oracle.updates == 5
    assert monitor.g2 == oracle.g2 and monitor.s == oracle.s
    assert monitor.b_simple == oracle.b_simple or math.isnan(oracle.b_simple)
    assert "global batch 8" in monitor.advice()


def test_interval_and_weights_bit_identical_with_and_without_the_monitor(float64):
    x, y = data(updates=6)
    final = []
    for interval in (2, None):
        net = model()
        net.compile(optimizer=DistributedOptimizer(SGD(learning_rate=0.3, momentum=0.9), backward_passes_per_step=2,
                                                   noise_scale_interval=interval), loss=loss(), jit_compile=False)
        monitor = NoiseScaleMonitor(batch_size=4) if interval else None
        net.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[monitor] if monitor else [])
        final.append([v.numpy() for v in net.trainable_variables])
        if monitor is not None:
            assert monitor.estimator.updates == 3 and monitor.estimator.step == 4  # updates 0, 2, 4 of 6
    assert all(np.array_equal(a, b) for a, b in zip(*final))


def test_config_round_trip_keeps_the_interval():
    opt = DistributedOptimizer(SGD(learning_rate=0.1), backward_passes_per_step=2, noise_scale_interval=5)
    again = DistributedOptimizer.from_config(opt.get_config())
    assert again.noise_scale_interval == 5 and again.backward_passes_per_step == 2


BAD_CONSTRUCTION = [
    ("optimizer interval zero", lambda: DistributedOptimizer(SGD(), noise_scale_interval=0), "noise_scale_interval"),
    ("optimizer interval float", lambda: DistributedOptimizer(SGD(), noise_scale_interval=1.5), "noise_scale_interval"),
    ("optimizer adasum", lambda: DistributedOptimizer(SGD(), op="adasum", noise_scale_interval=1), "Average or Sum"),
    ("monitor batch size", lambda: NoiseScaleMonitor(batch_size=0), "batch_size"),
    ("monitor decay one", lambda: NoiseScaleMonitor(batch_size=4, ema_decay=1.0), "ema_decay"),
    ("monitor decay negative", lambda: NoiseScaleMonitor(batch_size=4, ema_decay=-0.1), "ema_decay"),
    ("monitor per tensor", lambda: NoiseScaleMonitor(batch_size=4, per_tensor=1), "per_tensor"),
]


@pytest.mark.parametrize("call, argument", [r[1:] for r in BAD_CONSTRUCTION], ids=[r[0] for r in BAD_CONSTRUCTION])
def test_bad_construction_names_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


@pytest.mark.parametrize(
    "optimizer, argument",
    [
        (lambda: DistributedOptimizer(SGD(), backward_passes_per_step=2), "optimizer"),  # no noise_scale_interval
        (lambda: SGD(), "optimizer"),
        (lambda: DistributedOptimizer(SGD(), noise_scale_interval=1), "backward_passes_per_step"),  # one rank, no passes
    ],
    ids=["interval not set", "not distributed", "one rank without micro-batches"],
)
def test_fit_refuses_before_the_first_step(optimizer, argument):
    x, y = data(updates=1)
    net = model()
    net.compile(optimizer=optimizer(), loss=loss(), jit_compile=False)
    before = [v.numpy().copy() for v in net.trainable_variables]
    with pytest.raises(ValueError, match=argument):
        net.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[NoiseScaleMonitor(batch_size=4)])
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, net.trainable_variables))


def test_without_horovod_initialised_says_so(monkeypatch):
    x, y = data(updates=1)
    net = model()
    net.compile(optimizer=DistributedOptimizer(SGD(), backward_passes_per_step=2, noise_scale_interval=1),
                loss=loss(), jit_compile=False)
    monkeypatch.setattr(horovod_backend, "horovod_is_running", lambda: False)
    with pytest.raises(ValueError, match=r"Horovod initialised: call horovod.tensorflow.init\(\)"):
        net.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[NoiseScaleMonitor(batch_size=4)])
