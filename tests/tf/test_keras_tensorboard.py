"""Keras's TensorBoard callback with the package's optimizer and callbacks: what reaches the event files.

``model.fit`` with LARS, :class:`~hvd_largebatch.tf.callbacks.GradualWarmupCallback`,
:class:`~hvd_largebatch.tf.callbacks.SkippedStepsLogger` and
``keras.callbacks.TensorBoard(update_freq="batch", write_graph=False)``; the event files are read
back with TensorFlow's summary iterator: the LR of every batch is the core
schedule's, and the skipped-step count (one NaN batch per epoch) is written
per batch and per epoch.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from hvd_largebatch import schedules
from hvd_largebatch.tf import LARS, callbacks

STEPS_PER_EPOCH, EPOCHS = 4, 2
SCHEDULE = schedules.goyal(0.05, 8, 32, steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS, warmup_epochs=1,
                         milestones=(1.5,))


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar in the event files under ``directory``."""
    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue
                scalars[value.tag][event.step] = float(tf.make_ndarray(value.tensor))
    return dict(scalars)


def test_learning_rate_and_skipped_steps_reach_the_event_files(tmp_path):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)])
    model.compile(optimizer=LARS(learning_rate=1.0, weight_decay=1e-4), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)), rng.normal(size=(32, 2))
    y[9, 1] = np.inf  # batch 1 of every epoch (batch size 8, no shuffle): a skipped step
    with pytest.warns(RuntimeWarning, match="skipped an update because a gradient holds NaN or Inf"):
        model.fit(
            x, y, batch_size=8, epochs=EPOCHS, shuffle=False, verbose=0,
            callbacks=[
                callbacks.GradualWarmupCallback(SCHEDULE),
                callbacks.SkippedStepsLogger(),
                keras.callbacks.TensorBoard(log_dir=str(tmp_path), update_freq="batch", write_graph=False),
            ],
        )
    train = read_scalars(tmp_path / "train")
    steps = range(EPOCHS * STEPS_PER_EPOCH)
    # TensorBoard numbers its batches from 1; batch b ran optimizer step b - 1
    assert train["batch_learning_rate"] == pytest.approx({s + 1: SCHEDULE(s) for s in steps}, rel=1e-6)
    assert train["batch_skipped_steps"] == {1: 0, 2: 1, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 2}
    assert train["epoch_skipped_steps"] == {0: 1, 1: 2}
    last_of_epoch = {e: SCHEDULE(STEPS_PER_EPOCH * (e + 1) - 1) for e in range(EPOCHS)}
    assert train["epoch_learning_rate"] == pytest.approx(last_of_epoch, rel=1e-6)
    assert [SCHEDULE(s) for s in (0, 3, 4, 6)] == pytest.approx([0.05, 0.1625, 0.2, 0.02])  # warmup, peak, decay
