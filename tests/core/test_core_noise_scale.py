"""The core gradient-noise-scale estimator: exact against per-example gradients, EMA, statistics, advice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hvd_largebatch import noise_scale
from hvd_largebatch.noise_scale import NoiseScaleEstimator


def group_sq_norms(per_example: np.ndarray, small_batch: int) -> tuple[float, float]:
    """``|G_s|^2`` (mean over groups) and ``|G_B|^2`` for the in-order split of the rows into groups."""
    groups = per_example.reshape(-1, small_batch, per_example.shape[1]).mean(axis=1)
    mean = per_example.mean(axis=0)
    return float(np.mean(np.sum(groups**2, axis=1))), float(mean @ mean)


@pytest.mark.parametrize("n, small_batch", [(12, 1), (12, 3), (12, 6), (40, 8)])
def test_estimates_from_norms_equal_the_closed_form_of_the_per_example_gradients(n, small_batch):
    rng = np.random.default_rng(n + small_batch)
    per_example = rng.normal(0.3, 1.0, size=(n, 7))
    small, big = group_sq_norms(per_example, small_batch)
    g2, s = noise_scale.unbiased_estimates(small, big, small_batch, n)
    exact_g2, exact_s = noise_scale.exact_estimates_from_per_example_gradients(per_example, small_batch)
    assert float(s) == pytest.approx(exact_s, rel=1e-10)
    assert float(g2) == pytest.approx(exact_g2, rel=1e-10)
    if small_batch == 1:  # S is the trace of the unbiased per-example gradient covariance
        assert exact_s == pytest.approx(float(np.trace(np.cov(per_example, rowvar=False))), rel=1e-12)


def ema_oracle(values: list[float], decay: float) -> float:
    """The bias-corrected EMA written as the weighted sum it is."""
    t = len(values)
    weights = [(1 - decay) * decay ** (t - 1 - i) for i in range(t)]
    return sum(w * v for w, v in zip(weights, values)) / (1 - decay**t)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.99])
def test_ema_is_bias_corrected_and_b_simple_is_the_ratio_of_the_averages(decay):
    rng = np.random.default_rng(1)
    est = NoiseScaleEstimator(8, 32, ema_decay=decay)
    kept_g2, kept_s = [], []
    for step in range(25):
        small, big = rng.uniform(1.0, 3.0), rng.uniform(0.5, 1.5)
        if step == 7:
            assert not est.update(math.inf, big, step)  # a non-finite measurement is skipped
            continue
        assert est.update(small, big, step)
        g2, s = noise_scale.unbiased_estimates(small, big, 8, 32)
        kept_g2.append(float(g2))
        kept_s.append(float(s))
    assert est.skipped == 1 and est.updates == 24 and est.step == 24
    assert est.g2 == pytest.approx(ema_oracle(kept_g2, decay), rel=1e-12)
    assert est.s == pytest.approx(ema_oracle(kept_s, decay), rel=1e-12)
    assert (est.raw_g2, est.raw_s) == (kept_g2[-1], kept_s[-1])
    expected = ema_oracle(kept_s, decay) / ema_oracle(kept_g2, decay)
    assert est.b_simple == pytest.approx(expected, rel=1e-12) if expected > 0 else math.isnan(est.b_simple)


def test_b_simple_is_nan_until_both_averages_are_positive():
    est = NoiseScaleEstimator(8, 16, ema_decay=0.9)
    assert math.isnan(est.b_simple) and math.isnan(est.g2)
    est.update(1.0, 2.0, 0)  # |G_s|^2 < |G_B|^2: S < 0
    assert est.s < 0 and math.isnan(est.b_simple)
    assert "not measurable yet" in est.advice(64)


def test_per_tensor_entries_sum_to_the_totals():
    rng = np.random.default_rng(2)
    per_tensor = NoiseScaleEstimator(4, 8, ema_decay=0.9, tensor_names=["w", "b"])
    total = NoiseScaleEstimator(4, 8, ema_decay=0.9)
    for step in range(5):
        small, big = rng.uniform(2.0, 2.4, size=2), rng.uniform(1.6, 2.0, size=2)
        per_tensor.update(small, big, step)
        total.update(small.sum(), big.sum(), step)
    values = per_tensor.per_tensor()
    assert list(values) == ["w", "b"]
    assert sum(v["g2"] for v in values.values()) == pytest.approx(total.g2, rel=1e-12)
    assert sum(v["s"] for v in values.values()) == pytest.approx(total.s, rel=1e-12)
    assert math.isfinite(total.b_simple)
    assert per_tensor.b_simple == pytest.approx(total.b_simple, rel=1e-12)


def test_state_dict_round_trips_through_json_and_continues_identically():
    rng = np.random.default_rng(3)
    a = NoiseScaleEstimator(8, 64, ema_decay=0.95)
    for step in range(4):
        a.update(rng.uniform(2, 3), rng.uniform(0.5, 1), step)
    b = NoiseScaleEstimator(8, 64, ema_decay=0.95)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step in range(4, 8):
        small, big = rng.uniform(2, 3), rng.uniform(0.5, 1)
        a.update(small, big, step)
        b.update(small, big, step)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="ema_decay"):
        NoiseScaleEstimator(8, 64, ema_decay=0.9).load_state_dict(a.state_dict())


def linear_regression_gradients(rng, count: int, delta: np.ndarray, noise: float) -> np.ndarray:
    """Per-example gradients of 0.5*(x.w - y)^2 at w = w* + delta, x ~ N(0, I), label noise N(0, noise^2)."""
    x = rng.normal(size=(count, delta.shape[0]))
    residual = x @ delta - noise * rng.normal(size=count)
    return x * residual[:, None]


def test_running_estimate_converges_to_the_known_noise_scale_of_linear_regression():
    # G = delta and Sigma = (|delta|^2 + noise^2) I + delta delta^T, so
    # B_simple = (d (|delta|^2 + noise^2) + |delta|^2) / |delta|^2 = 21 for d = 10, |delta| = 1, noise = 1.
    d, noise = 10, 1.0
    delta = np.zeros(d)
    delta[0] = 1.0
    truth = (d * (1.0 + noise**2) + 1.0) / 1.0
    rng = np.random.default_rng(4)
    est = NoiseScaleEstimator(small_batch=8, big_batch=32, ema_decay=0.998)
    for step in range(3000):
        grads = linear_regression_gradients(rng, 32, delta, noise)
        small, big = group_sq_norms(grads, 8)  # 4 "ranks" of 8 examples
        est.update(small, big, step)
    assert est.b_simple == pytest.approx(truth, rel=0.10)
    assert est.g2 == pytest.approx(1.0, rel=0.10)
    assert est.s == pytest.approx(truth, rel=0.10)


@pytest.mark.parametrize(
    "b_simple, batch, words",
    [
        (1900.0, 8192, ["B_simple ~ 1,900 at step 3,000", "4.3x above it", "diminishing returns", "about 9% of the steps"]),
        (4000.0, 512, ["7.8x below it", "almost linearly", "about 44% of the steps"]),
        (1000.0, 1024, ["close to it", "critical batch", "about 25% of the steps"]),
        (math.nan, 1024, ["not measurable yet at step 3,000"]),
    ],
)
def test_advice_compares_the_global_batch_with_the_noise_scale(b_simple, batch, words):
    text = noise_scale.advice(b_simple, batch, step=3000)
    for word in words:
        assert word in text, text
    assert "S_min*(1 + B_crit/B)" in text or "not measurable" in text


def test_batch_sizes_under_data_parallelism():
    assert noise_scale.batch_sizes(32, 4) == (32, 128)
    assert noise_scale.batch_sizes(32, 4, 2) == (64, 256)
    assert noise_scale.batch_sizes(32, 1, 4) == (32, 128)  # one rank: micro-batches are the small batches
