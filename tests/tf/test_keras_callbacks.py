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
        (keras.optimizers.Adam(), callbacks.SkippedStepsLogger(), {},
         r"SkippedStepsLogger reads the skipped_steps counter of the package's optimizers .*; the model's optimizer is Adam"),
    ],
    ids=["lr-is-a-schedule", "correction-disagrees", "steps-per-execution", "skipped-steps-keras-optimizer"],
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


# ------------------------------------------------------------------------------------------ LR ownership
def test_reduce_lr_on_plateau_composes_with_the_warmup_as_a_multiplier(float64):
    """ReduceLROnPlateau halves the LR after epoch 2: the rest of the schedule runs at half its value."""
    record = RecordLR()
    warmup = callbacks.GradualWarmupCallback(SCHEDULE)
    # min_delta=1e9: no epoch after the first counts as an improvement, so with patience=0 the LR is
    # reduced at the end of the second epoch (index 1), and again at the end of the third.
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)
    model, _ = train(LARS(learning_rate=1.0), [warmup, plateau, record])
    expected = [SCHEDULE(s) * (0.5 if s >= 2 * STEPS_PER_EPOCH else 1.0) for s in range(3 * STEPS_PER_EPOCH)]
    assert [row[0] for row in record.rows] == list(range(3 * STEPS_PER_EPOCH))
    assert [row[1] for row in record.rows] == pytest.approx(expected, rel=1e-15)
    assert [row[2] for row in record.rows] == pytest.approx(expected, rel=1e-15)
    assert warmup.lr_multiplier == 0.5 ** 1  # the second reduction came after the last batch
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.25 * SCHEDULE(11), rel=1e-15)


class SetLRAtEpochEnd(keras.callbacks.Callback):
    def __init__(self, epoch, lr):
        super().__init__()
        self.epoch, self.lr = epoch, lr

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.optimizer.learning_rate = self.lr


def test_a_user_change_multiplies_the_schedule_and_the_multiplier_can_be_given(float64):
    record = RecordLR()
    warmup = callbacks.GradualWarmupCallback(SCHEDULE, lr_multiplier=2.0)
    train(SGD(learning_rate=1.0), [warmup, SetLRAtEpochEnd(0, 3 * SCHEDULE(3)), record])
    # epoch 1 at 2x the schedule; the user set 3x the last value: 1.5 times what the callback had set
    expected = [SCHEDULE(s) * (2.0 if s < STEPS_PER_EPOCH else 3.0) for s in range(3 * STEPS_PER_EPOCH)]
    assert [row[1] for row in record.rows] == pytest.approx(expected, rel=1e-14)
    assert warmup.lr_multiplier == pytest.approx(3.0, rel=1e-14)


def test_training_past_the_schedule_warns_once_and_a_change_at_lr_0_is_overridden(float64, recwarn):
    schedule = schedules.make_schedule(0.1, 8, peak=0.3, warmup_steps=4, decay="linear", end_lr=0.0)
    record = RecordLR()
    train(SGD(learning_rate=1.0), [callbacks.GradualWarmupCallback(schedule), SetLRAtEpochEnd(2, 0.7), record],
          epochs=4)
    assert [row[1] for row in record.rows] == pytest.approx([schedule(s) for s in range(16)], rel=1e-15, abs=0)
    assert [row[1] for row in record.rows[8:]] == [0.0] * 8
    messages = [str(w.message) for w in recwarn if "GradualWarmupCallback" in str(w.message)]
    assert messages == [
        "GradualWarmupCallback: optimizer step 8 is past the schedule's total_steps=8; the LR stays at the schedule's "
        "final value 0 (times lr_multiplier). total_steps counts optimizer updates: check the schedule's "
        "steps_per_epoch and epochs against the batches per epoch",
        "GradualWarmupCallback: the learning rate was changed to 0.7 while the schedule's was 0; a change from 0 is "
        "no factor on the schedule, so the schedule's value is set again",
    ]


# -------------------------------------------------------------------------------------- skipped steps
def regression_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 6))
    y = np.stack([x[:, 0] - 2 * x[:, 1], np.sin(x[:, 2]), x[:, 3]], axis=1)
    y[20, 0] = np.nan  # batch 2 of every epoch (batch size 8, no shuffle): NaN gradients, a skipped step
    return x, y


class RecordLogs(keras.callbacks.Callback):
    def __init__(self, key):
        super().__init__()
        self.key, self.batches = key, []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(logs.get(self.key))


SKIP_WARNING = (
    "LARS: skipped an update because a gradient holds NaN or Inf (weights and optimizer state untouched); "
    "{count} update(s) skipped so far (skipped_steps in the logs). Warned at the first skip and every {every}th; "
    "pass nonfinite='raise' to stop instead"
)


@pytest.mark.parametrize("warn_every, warned_counts", [(2, [1, 2]), (100, [1])])
def test_skipped_steps_reach_the_logs_and_warn_at_the_first_and_every_nth(float64, warn_every, warned_counts):
    model = small_model()
    model.compile(optimizer=LARS(learning_rate=0.1), loss="mse")
    record = RecordLogs(callbacks.SKIPPED_STEPS_KEY)
    x, y = regression_data()
    with pytest.warns(RuntimeWarning) as caught:
        history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                            callbacks=[callbacks.SkippedStepsLogger(warn_every=warn_every), record])
    assert history.history["skipped_steps"] == [1, 2, 3]
    assert record.batches == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert int(model.optimizer.skipped_steps.numpy()) == 3
    warned = [str(w.message) for w in caught if "skipped an update" in str(w.message)]
    assert warned == [SKIP_WARNING.format(count=c, every=warn_every) for c in warned_counts]
