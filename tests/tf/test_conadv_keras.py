"""ConAdv for Keras: staleness pinned in float64 against a NumPy reference under model.fit, attack bounds
and modes, dual BatchNorm, save/load, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras
from conadv_reference import ATTACK, BATCH, CLASSES, DIM, LR, STEPS, reference_conadv
from conadv_reference import problem as _problem
from conadv_reference import reference_attack as _reference_attack
from hvd_largebatch.config import ConAdvConfig
from hvd_largebatch.tf.conadv import ConAdv, _random_wrong_labels
from hvd_largebatch.tf.dual_bn import (
    DualBatchNormalization,
    auxiliary_bn,
    convert_from_dual_bn,
    convert_to_dual_bn,
)


def _reference_conadv(W, b, batches, tau, average=False):
    """The shared reference's weights with this file's ``ATTACK``."""
    thetas, _ = reference_conadv(
        W, b, batches, tau, ATTACK["epsilon"], ATTACK["step_size"], ATTACK["attack_iters"], ATTACK["adv_weight"],
        ATTACK["input_range"], average,
    )
    return thetas


class _RecordWeights(keras.callbacks.Callback):
    def __init__(self, dense):
        super().__init__()
        self.dense, self.thetas = dense, []

    def on_train_batch_begin(self, batch, logs=None):
        if not self.thetas:
            self.thetas.append(self._weights())

    def on_train_batch_end(self, batch, logs=None):
        self.thetas.append(self._weights())

    def _weights(self):
        kernel, bias = self.dense.get_weights()
        return kernel.T.copy(), bias.copy()


def _linear_model(W, b):
    base = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(CLASSES, name="dense")])
    base.get_layer("dense").set_weights([W.T, b])
    return base


def _keras_run(W, b, batches, **conadv_kwargs):
    base = _linear_model(W, b)
    model = ConAdv(base, random_start_prob=0.0, targeted=False, **conadv_kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(LR), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    recorder = _RecordWeights(base.get_layer("dense"))
    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
    return model, recorder.thetas


@pytest.mark.parametrize("tau", [0, 1, 2])
def test_staleness_is_exact_in_float64_under_fit(float64, tau):
    W, b, batches = _problem()
    model, thetas = _keras_run(W, b, batches, staleness=tau, dual_bn=False, **ATTACK)
    reference = _reference_conadv(W, b, batches, tau)
    assert len(thetas) == len(reference) == STEPS + 1
    for t, ((got_W, got_b), (ref_W, ref_b)) in enumerate(zip(thetas, reference)):
        np.testing.assert_allclose(got_W, ref_W, rtol=1e-10, atol=1e-12, err_msg=f"weights after {t} steps")
        np.testing.assert_allclose(got_b, ref_b, rtol=1e-10, atol=1e-12, err_msg=f"bias after {t} steps")
    assert int(model._step.numpy()) == STEPS
    # The snapshot queue holds theta_{T-tau}, ..., theta_{T-1} at the end.
    for slot, snapshot in enumerate(model._snapshots):
        kernel, bias = (v.numpy() for v in snapshot)
        np.testing.assert_allclose(kernel.T, reference[STEPS - tau + slot][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bias, reference[STEPS - tau + slot][1], rtol=1e-10, atol=1e-12)


def test_average_losses_trains_on_the_weighted_mean(float64):
    W, b, batches = _problem()
    _, thetas = _keras_run(W, b, batches, staleness=1, dual_bn=False, average_losses=True, **ATTACK)
    reference = _reference_conadv(W, b, batches, 1, average=True)
    for (got_W, got_b), (ref_W, ref_b) in zip(thetas, reference, strict=True):
        np.testing.assert_allclose(got_W, ref_W, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got_b, ref_b, rtol=1e-10, atol=1e-12)
    assert not np.allclose(thetas[-1][0], _reference_conadv(W, b, batches, 1)[-1][0])


def test_staleness_is_observable_on_the_reference_problem():
    W, b, batches = _problem()
    finals = {tau: _reference_conadv(W, b, batches, tau)[-1][0] for tau in (0, 1, 2)}
    assert not np.allclose(finals[0], finals[1]) and not np.allclose(finals[1], finals[2])


def test_the_attack_uses_the_weights_it_is_given(float64):
    # The graph's attack function at theta_{t-1} equals the NumPy attack at theta_{t-1}, not at theta_t.
    W, b, batches = _problem(seed=2)
    model, thetas = _keras_run(W, b, batches, staleness=1, dual_bn=False, **ATTACK)
    mismatching_fresh = 0
    for t in range(1, STEPS):
        x, y = batches[t]
        stale_W, stale_b = thetas[t - 1]
        got = model._adversarial_examples([tf.constant(stale_W.T), tf.constant(stale_b)], tf.constant(x), tf.constant(y), tf.constant(t, tf.int64))
        expected = _reference_attack(stale_W, stale_b, x, y, 0.3, 0.2, 2, (-1.0, 1.0))
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
        mismatching_fresh += not np.allclose(expected, _reference_attack(*thetas[t], x, y, 0.3, 0.2, 2, (-1.0, 1.0)))
    assert mismatching_fresh >= 3


# ---------------------------------------------------------------------------------------------
# The attack itself
# ---------------------------------------------------------------------------------------------
def _small_cnn():
    return keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Reshape((12, 1)),
            keras.layers.Conv1D(4, 3, padding="same"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(5),
        ]
    )


def _compiled(model, loss=None):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.mark.parametrize("targeted", [True, False])
def test_perturbations_stay_within_epsilon_and_the_input_range(float64, targeted):
    model = _compiled(ConAdv(convert_to_dual_bn(_small_cnn()), epsilon=0.25, step_size=0.15, attack_iters=4, random_start_prob=1.0, targeted=targeted, seed=3))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(32, 12))
    x[:4] = 1.0
    y = rng.integers(0, 5, size=32)
    weights = [v.value for v in model.base_model.trainable_variables]
    x_adv = model._adversarial_examples(weights, tf.constant(x), tf.constant(y), tf.constant(0, tf.int64)).numpy()
    assert np.abs(x_adv - x).max() <= 0.25 * (1 + 1e-12) and np.abs(x_adv - x).max() >= 0.2
    assert x_adv.min() >= -1.0 and x_adv.max() <= 1.0


def test_random_start_is_per_example_with_the_given_probability(float64):
    base = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3, kernel_initializer="zeros")])
    model = _compiled(ConAdv(base, epsilon=0.5, step_size=0.1, random_start_prob=0.8, targeted=False, input_range=None, seed=1))
    x_adv = model._adversarial_examples(
        [v.value for v in base.trainable_variables], tf.zeros((4000, 10), tf.float64), tf.zeros(4000, tf.int64), tf.constant(0, tf.int64)
    ).numpy()
    started = (x_adv != 0).any(axis=1)
    assert ((x_adv != 0).all(axis=1) | ~started).all()
    assert 0.77 < started.mean() < 0.83
    assert 0.45 < np.abs(x_adv).max() <= 0.5


@pytest.mark.parametrize("one_hot", [False, True])
def test_targeted_mode_moves_toward_a_random_wrong_class(float64, one_hot):
    keras.utils.set_random_seed(1)
    base = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(4)])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True) if one_hot else None
    model = _compiled(ConAdv(base, epsilon=0.01, step_size=0.01, random_start_prob=0.0, targeted=True, input_range=None, seed=5), loss)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(64, DIM))
    labels = rng.integers(0, 4, size=64)
    y = np.eye(4)[labels] if one_hot else labels
    step = tf.constant(3, tf.int64)
    weights = [v.value for v in base.trainable_variables]
    x_adv = model._adversarial_examples(weights, tf.constant(x), tf.constant(y), step).numpy()
    # The targets, drawn as in the attack: seed (seed, step) folded with 2.
    seed = tf.random.experimental.stateless_fold_in(tf.constant([5, 3], tf.int64), 2)
    target = _random_wrong_labels(tf.constant(y), base(x), seed).numpy()
    target = target.argmax(axis=1) if one_hot else target
    assert (target != labels).all() and len(set(target.tolist())) > 1
    ce = lambda inputs: keras.losses.sparse_categorical_crossentropy(target, base(inputs), from_logits=True).numpy()  # noqa: E731
    assert (ce(x_adv) < ce(x)).all()

    up = _compiled(ConAdv(base, epsilon=0.01, step_size=0.01, random_start_prob=0.0, targeted=False, input_range=None), loss)
    x_up = up._adversarial_examples(weights, tf.constant(x), tf.constant(y), step).numpy()
    true_ce = lambda inputs: keras.losses.sparse_categorical_crossentropy(labels, base(inputs), from_logits=True).numpy()  # noqa: E731
    assert (true_ce(x_up) > true_ce(x)).all()


# ---------------------------------------------------------------------------------------------
# Dual BatchNorm
# ---------------------------------------------------------------------------------------------
def _bn_problem():
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, size=(6 * BATCH, DIM))
    y = rng.integers(0, CLASSES, size=6 * BATCH)
    base = keras.Sequential([keras.Input((DIM,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(CLASSES)])
    return base, x, y


def test_main_bn_statistics_are_untouched_by_adversarial_batches(float64):
    base, x, y = _bn_problem()
    with pytest.raises(ValueError, match=r"plain BatchNorm layers \(bn\).*model = hvd_largebatch.tf.convert_to_dual_bn\(model\)"):
        ConAdv(base, epsilon=0.3, step_size=0.3, seed=0)  # refused, as in PyTorch: never converted behind the user's back
    model = _compiled(ConAdv(convert_to_dual_bn(base), epsilon=0.3, step_size=0.3, seed=0))
    assert isinstance(model.base_model.get_layer("bn"), DualBatchNormalization)
    assert isinstance(base.get_layer("bn"), keras.layers.BatchNormalization)  # the user's model is not modified
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    mean, var = np.zeros(DIM), np.ones(DIM)
    for start in range(0, len(x), BATCH):  # Keras's moving averages over the clean batches only
        batch = x[start:start + BATCH]
        mean = mean * 0.99 + batch.mean(axis=0) * 0.01
        var = var * 0.99 + batch.var(axis=0) * 0.01
    bn = model.base_model.get_layer("bn")
    np.testing.assert_allclose(bn.main.moving_mean.numpy(), mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(bn.main.moving_variance.numpy(), var, rtol=1e-12, atol=1e-15)
    assert not np.allclose(bn.auxiliary.moving_mean.numpy(), mean)  # the adversarial batches went there
    assert not np.allclose(bn.main.gamma.numpy(), bn.auxiliary.gamma.numpy())  # both affine sets trained


def test_without_dual_bn_main_statistics_see_adversarial_batches(float64):
    base, x, y = _bn_problem()
    model = _compiled(ConAdv(base, epsilon=0.3, step_size=0.3, dual_bn=False, seed=0))
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    clean_only = x[:BATCH].mean(axis=0) * 0.01
    assert not np.allclose(model.base_model.get_layer("bn").moving_mean.numpy(), clean_only)


def test_converter_keeps_the_function_and_evaluation_uses_main_bn(float64):
    base, x, y = _bn_problem()
    base(x, training=True)  # non-trivial moving statistics
    dual = convert_to_dual_bn(base)
    np.testing.assert_array_equal(dual.predict(x, verbose=0), base.predict(x, verbose=0))
    with auxiliary_bn(dual):
        np.testing.assert_array_equal(dual(x, training=False).numpy(), base(x, training=False).numpy())
    model = _compiled(ConAdv(dual, epsilon=0.3, step_size=0.3, seed=0))
    assert model.base_model is dual  # already dual: not copied again
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    plain = convert_from_dual_bn(model.base_model)
    assert isinstance(plain.get_layer("bn"), keras.layers.BatchNormalization)
    np.testing.assert_array_equal(model.predict(x, verbose=0), plain.predict(x, verbose=0))
    with auxiliary_bn(model.base_model):
        assert not np.allclose(model.base_model(x, training=False).numpy(), plain(x, training=False).numpy())


def test_save_and_load_keep_both_bn_sets_and_snapshots_and_training_continues_exactly(float64, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(6 * 16, 12))
    y = rng.integers(0, 5, size=6 * 16)
    model = _compiled(ConAdv(convert_to_dual_bn(_small_cnn()), epsilon=0.2, step_size=0.1, staleness=2, random_start_prob=0.5, seed=9))
    model.fit(x[:48], y[:48], batch_size=16, shuffle=False, verbose=0)
    path = tmp_path / "conadv.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, ConAdv) and loaded.conadv_config == model.conadv_config and loaded.seed == 9
    assert isinstance(loaded.base_model.get_layer("bn"), DualBatchNormalization)
    assert len(loaded.weights) == len(model.weights)
    for saved, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())
    assert int(loaded._step.numpy()) == 3
    model.fit(x[48:], y[48:], batch_size=16, shuffle=False, verbose=0)
    loaded.fit(x[48:], y[48:], batch_size=16, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14, err_msg=a.path)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
BAD_ARGUMENTS = [
    ("epsilon", 0.0), ("epsilon", -0.1), ("step_size", 0), ("staleness", -1), ("staleness", 1.5),
    ("attack_iters", 0), ("random_start_prob", 1.5), ("targeted", 1), ("adv_weight", -1.0),
    ("dual_bn", "yes"), ("average_losses", 1), ("input_range", (1.0, -1.0)), ("input_range", 3.0), ("seed", -1), ("seed", 0.5),
]


@pytest.mark.parametrize("argument,value", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(argument, value):
    with pytest.raises(ValueError, match=argument):
        ConAdv(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), **{argument: value})


def test_defaults_come_from_the_core_config_and_bad_models_are_refused():
    assert ConAdv(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])).conadv_config == ConAdvConfig()
    with pytest.raises(ValueError, match="base_model"):
        ConAdv(keras.layers.Dense(2))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, inputs):
            return self.bn(inputs)

    subclassed = Subclassed()
    subclassed(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="convert_to_dual_bn"):
        ConAdv(subclassed)
    with pytest.raises(ValueError, match="DualBatchNormalization"):
        convert_to_dual_bn(subclassed)
    with pytest.raises(ValueError, match="renorm"):
        convert_to_dual_bn(keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(renorm=True)]))


def test_an_unbuilt_base_model_is_built_on_the_first_batch_unless_it_needs_conversion():
    model = ConAdv(keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(3)]), input_range=None, seed=0)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.random.default_rng(0).normal(size=(16, 5)), np.zeros(16), batch_size=8, verbose=0)
    assert int(model._step.numpy()) == 2 and len(model._snapshots[0]) == 4
    with pytest.raises(ValueError, match="convert_to_dual_bn"):
        ConAdv(keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization()]))
    with pytest.raises(ValueError, match="must be built"):
        convert_to_dual_bn(keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization()]))


def test_fit_without_a_loss_is_refused():
    model = ConAdv(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), input_range=None)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="loss"):
        model.fit(np.zeros((4, 3)), np.zeros(4), verbose=0)
