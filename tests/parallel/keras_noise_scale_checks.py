"""Gradient-noise-scale checks of hvd_largebatch.tf under ``model.fit``, run inside keras_worker.py's launch (float64).

Rank r fits on its part of every global batch (``shuffle=False``); before each
update a callback computes, on every rank, the per-example gradients of the
whole global batch and the closed-form estimates the monitor must reproduce.
"""

from __future__ import annotations

import hashlib
from typing import Any

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

from hvd_largebatch import noise_scale
from hvd_largebatch.tf import SGD, DistributedOptimizer, NoiseScaleMonitor, callbacks

PER_RANK = 4
STEPS = 4
FEATURES, CLASSES = 5, 3


def model() -> keras.Model:
    keras.utils.set_random_seed(11)
    inputs = keras.Input((FEATURES,))
    x = keras.layers.Dense(6, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(x))


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def global_data():
    rng = np.random.default_rng(77)
    global_batch = hvd.size() * PER_RANK
    x = rng.normal(size=(STEPS * global_batch, FEATURES))
    return x, rng.integers(0, CLASSES, size=STEPS * global_batch), global_batch


class ClosedForm(keras.callbacks.Callback):
    """Before each update: the exact (G2, S) of the whole global batch at the current weights."""

    def __init__(self, x, y, global_batch: int, passes: int):
        super().__init__()
        self.x, self.y, self.global_batch, self.passes = x, y, global_batch, passes
        self.exact: list[list[float]] = []

    def on_train_batch_begin(self, batch, logs=None):
        if batch % self.passes:
            return
        start = (batch // self.passes) * self.global_batch
        rows = []
        for i in range(start, start + self.global_batch):
            with tf.GradientTape() as tape:
                value = loss()(self.y[i:i + 1], self.model(self.x[i:i + 1], training=True))
            grads = tape.gradient(value, self.model.trainable_variables)
            rows.append(np.concatenate([g.numpy().reshape(-1) for g in grads]))
        self.exact.append(list(noise_scale.exact_estimates_from_per_example_gradients(np.stack(rows), PER_RANK)))


class Record(keras.callbacks.Callback):
    """After each update: what the monitor fed its estimator (placed after the monitor)."""

    def __init__(self, monitor: NoiseScaleMonitor, passes: int):
        super().__init__()
        self.monitor, self.passes = monitor, passes
        self.rows: dict[str, list] = {"local": [], "small": [], "big": [], "raw": [], "b_simple": [], "logged": []}

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.passes:
            return
        self.rows["local"].append(self.monitor.last_local_sq_norms)
        self.rows["small"].append(self.monitor.last_small_sq_norms)
        self.rows["big"].append(self.monitor.last_big_sq_norms)
        self.rows["raw"].append([self.monitor.raw_g2, self.monitor.raw_s])
        self.rows["b_simple"].append(self.monitor.b_simple)
        self.rows["logged"].append(logs["b_simple"])


def fit(monitored: bool, passes: int) -> dict[str, Any]:
    x, y, global_batch = global_data()
    rank, part = hvd.rank(), PER_RANK
    local = np.concatenate([np.arange(s + rank * part, s + (rank + 1) * part) for s in range(0, len(x), global_batch)])
    net = model()
    opt = DistributedOptimizer(
        SGD(learning_rate=0.3), backward_passes_per_step=passes, noise_scale_interval=1 if monitored else None
    )
    net.compile(optimizer=opt, loss=loss(), jit_compile=False)
    closed = ClosedForm(x, y, global_batch, passes)
    cbs: list = [callbacks.BroadcastGlobalVariablesCallback(0), closed]
    monitor = record = None
    if monitored:
        monitor = NoiseScaleMonitor(batch_size=PER_RANK // passes, ema_decay=0.5)
        record = Record(monitor, passes)
        cbs += [monitor, record]
    history = net.fit(x[local], y[local], batch_size=PER_RANK // passes, epochs=1, shuffle=False, verbose=0, callbacks=cbs)
    h = hashlib.sha256()
    for v in net.trainable_variables:
        h.update(np.ascontiguousarray(v.numpy()).tobytes())
    out: dict[str, Any] = {"digest": h.hexdigest(), "exact": closed.exact}
    if monitor is not None:
        out.update(record.rows)
        out["history_b_simple"] = history.history["b_simple"]
        out["final_b_simple"] = monitor.b_simple
        out["batches"] = [monitor.estimator.small_batch, monitor.estimator.big_batch]
        out["updates"] = monitor.estimator.updates
    return out


def run_checks() -> dict[str, Any]:
    """The results under the key ``noise_scale/...`` (compared by test_keras_parallel.py)."""
    results: dict[str, Any] = {}
    for passes in (1, 2):
        on = fit(monitored=True, passes=passes)
        off = fit(monitored=False, passes=passes)
        results[f"noise_scale/passes{passes}"] = {**on, "digest_off": off["digest"]}
    return results
