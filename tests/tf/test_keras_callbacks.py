"""The per-batch LR callbacks and ScheduleAdapter in a single process (Horovod-free parts).

* the LR of every batch is the core schedule's value at the optimizer's step,
  and it is logged (batch and epoch logs, hence History and TensorBoard);
* momentum correction: Keras's SGD driven by the callback (which rescales its
  momentum slots) trains exactly like the package's SGD, which corrects its
  own velocity; without correction the two agree again, and differ from the
  corrected run;
* the callback and ScheduleAdapter give the same training;
* refusals at ``fit`` start.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from hvd_largebatch import schedules
from hvd_largebatch.tf import LAMB, LARS, SGD, ScheduleAdapter, callbacks

STEPS_PER_EPOCH = 4
SCHEDULE = schedules.goyal(0.05, 8, 32, steps_per_epoch=STEPS_PER_EPOCH, epochs=3, warmup_epochs=1, milestones=(2,))


class RecordLR(keras.callbacks.Callback):
    """Records, per batch, the optimizer step, the optimizer's LR and the logged LR."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        step = int(optimizer.iterations.numpy()) - 1  # the step that just ran
        self.rows.append((step, float(keras.ops.convert_to_numpy(optimizer.learning_rate)), logs.get("learning_rate")))


def small_model(seed=5):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(7, activation="relu", name="dense")(inputs)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def data():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(32, 6))
    return x, rng.integers(0, 3, size=32)


def train(optimizer, extra_callbacks, epochs=3):
    model = small_model()
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    history = model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=extra_callbacks)
    return model, history


def test_gradual_warmup_sets_and_logs_the_schedule_every_batch(float64):
    record = RecordLR()
    _, history = train(LARS(learning_rate=1.0), [callbacks.GradualWarmupCallback(SCHEDULE), record])
    steps = [row[0] for row in record.rows]
    assert steps == list(range(3 * STEPS_PER_EPOCH))
    for step, optimizer_lr, logged_lr in record.rows:
        assert optimizer_lr == pytest.approx(SCHEDULE(step), rel=1e-15)
        assert logged_lr == pytest.approx(SCHEDULE(step), rel=1e-15)
    # The ramp is per iteration (Goyal), then the step decay at epoch 2.
    assert [round(SCHEDULE(s), 6) for s in (0, 1, 2, 3, 4, 8)] == [0.05, 0.0875, 0.125, 0.1625, 0.2, 0.02]
    last_of_epoch = [SCHEDULE(STEPS_PER_EPOCH * (e + 1) - 1) for e in range(3)]
    assert history.history["learning_rate"] == pytest.approx(last_of_epoch, rel=1e-15)


def test_gradual_warmup_accepts_make_schedule_arguments(float64):
    record = RecordLR()
    args = dict(base_lr=0.1, total_steps=8, peak=0.3, warmup_steps=4, decay="linear", end_lr=0.05)
    train(SGD(learning_rate=1.0), [callbacks.GradualWarmupCallback(args), record], epochs=2)
    expected = schedules.make_schedule(**args)
    assert [row[1] for row in record.rows] == pytest.approx([expected(s) for s in range(8)], rel=1e-15)


@pytest.mark.parametrize("correction", [True, False])
def test_keras_sgd_with_the_callback_trains_like_our_sgd(float64, correction):
    """Keras's m = momentum * m - lr * g holds the LR; the callback's rescaling is Goyal's correction.

    momentum = 0.875 because Keras's SGD casts its Python-float momentum via
    float32 (0.9 would become 0.89999998 in float64 runs).
    """
    ours, _ = train(SGD(learning_rate=1.0, momentum=0.875, momentum_correction=correction),
                    [callbacks.GradualWarmupCallback(SCHEDULE, momentum_correction=correction)])
    theirs, _ = train(keras.optimizers.SGD(learning_rate=1.0, momentum=0.875),
                      [callbacks.GradualWarmupCallback(SCHEDULE, momentum_correction=correction)])
    for a, b in zip(ours.trainable_variables, theirs.trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-11, atol=1e-14, err_msg=a.path)
    # Our slot holds m = -v, Keras's momentum has the same sign and meaning.
    for a, b in zip(ours.optimizer.momentums, theirs.optimizer.momentums):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-11, atol=1e-14)


def test_momentum_correction_changes_the_trajectory(float64):
    corrected, _ = train(SGD(learning_rate=1.0), [callbacks.GradualWarmupCallback(SCHEDULE)])
    plain, _ = train(SGD(learning_rate=1.0, momentum_correction=False),
                     [callbacks.GradualWarmupCallback(SCHEDULE, momentum_correction=False)])
    difference = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                     for a, b in zip(corrected.trainable_variables, plain.trainable_variables))
    assert difference > 1e-4


@pytest.mark.parametrize("factory", [lambda lr: LARS(learning_rate=lr, weight_decay=1e-3), lambda lr: LAMB(learning_rate=lr)],
                         ids=["lars", "lamb"])
def test_the_callback_and_the_schedule_adapter_train_alike(float64, factory):
    by_callback, _ = train(factory(1.0), [callbacks.LearningRateScheduleCallback(SCHEDULE)])
    by_adapter, _ = train(factory(ScheduleAdapter(SCHEDULE)), [])
    for a, b in zip(by_callback.trainable_variables, by_adapter.trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-12, atol=1e-15, err_msg=a.path)


def test_verbose_prints_the_lr_at_epoch_start_and_warmup_end(float64, capsys):
    train(SGD(learning_rate=1.0), [callbacks.GradualWarmupCallback(SCHEDULE, verbose=1)], epochs=2)
    out = capsys.readouterr().out
    assert "Epoch 1: GradualWarmupCallback learning rate = 0.05 (step 0)" in out
    assert "warmup done at step 4, learning rate = 0.2" in out


@pytest.mark.parametrize(
    "optimizer, callback, compile_kwargs, message",
    [
        (LARS(learning_rate=ScheduleAdapter(SCHEDULE)), callbacks.GradualWarmupCallback(SCHEDULE), {}, "learning_rate is a schedule"),
        (LARS(learning_rate=0.1), callbacks.GradualWarmupCallback(SCHEDULE, momentum_correction=False), {},
         "momentum_correction=False disagrees"),
        (SGD(learning_rate=0.1), callbacks.LearningRateScheduleCallback(SCHEDULE), {"steps_per_execution": 2},
         "steps_per_execution=1"),
    ],
    ids=["lr-is-a-schedule", "correction-disagrees", "steps-per-execution"],
)
def test_refusals_at_fit_start(optimizer, callback, compile_kwargs, message):
    model = small_model()
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    x, _ = data()
    with pytest.raises(ValueError, match=message):
        model.fit(x, np.zeros((32, 3)), batch_size=8, verbose=0, callbacks=[callback])


def test_schedule_adapter_follows_the_schedule_past_its_end():
    adapter = ScheduleAdapter(SCHEDULE)
    total = SCHEDULE.total_steps
    for step in (0, 1, 3, 4, 7, 8, total - 1, total, total + 50):
        assert float(adapter(step)) == pytest.approx(SCHEDULE(step), rel=1e-6)
