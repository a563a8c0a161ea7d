"""PyTorch vs Keras vs the NumPy oracle: the same tiny model, data and schedule, float64, 12 steps.

The model is a 5-8-3 tanh MLP with softmax cross-entropy; every framework
starts from the same weights and takes the same batches in the same order,
with an LR that changes every step (gradual warmup from a core schedule, so
momentum correction is exercised):

* PyTorch: ``hvd_largebatch.torch_impl.create_optimizer`` in a training loop
  with ``GradualWarmupScheduler`` (CLARS: ``add_grad_norms``);
* Keras: ``hvd_largebatch.tf.create_optimizer`` under ``model.fit`` with
  ``GradualWarmupCallback`` (CLARS: ``CLARSModel``);
* oracle: :class:`hvd_largebatch.reference.ReferenceOptimizer` fed with
  gradients (and per-example gradient norms) computed by hand in NumPy.

All three must agree to a relative error of 1e-10 (ALGORITHMS.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from keras.src.backend.common import global_state  # noqa: E402

from hvd_largebatch import config, reference, schedules  # noqa: E402
from hvd_largebatch.tf import CLARSModel, callbacks  # noqa: E402
from hvd_largebatch.tf import create_optimizer as create_keras_optimizer  # noqa: E402
from hvd_largebatch.torch_impl import GradualWarmupScheduler  # noqa: E402
from hvd_largebatch.torch_impl import create_optimizer as create_torch_optimizer  # noqa: E402

IN, HIDDEN, OUT = 5, 8, 3
BATCH, STEPS = 16, 12
RTOL = 1e-10
SCHEDULE = schedules.make_schedule(0.1, STEPS, peak=0.4, warmup_steps=6, decay="cosine", end_lr=0.05)

# (id, name, core kwargs shared by the oracle and torch, Keras spelling of the same)
CASES = [
    ("sgd", "sgd", dict(weight_decay=1e-2, nesterov=True), dict(weight_decay=1e-2, nesterov=True)),
    ("lars", "lars", dict(weight_decay=1e-3, trust_coefficient=0.05), dict(weight_decay=1e-3, trust_coefficient=0.05)),
    ("larc", "larc", dict(weight_decay=1e-3, trust_coefficient=0.5, eps=1e-6),
     dict(weight_decay=1e-3, trust_coefficient=0.5, epsilon=1e-6)),
    ("clars-exact", "clars", dict(weight_decay=1e-3, trust_coefficient=0.05, chunk_size=5),
     dict(weight_decay=1e-3, trust_coefficient=0.05, chunk_size=5)),
    ("clars-microbatch", "clars", dict(trust_coefficient=0.05, estimator="microbatch:4"),
     dict(trust_coefficient=0.05, estimator="microbatch:4")),
    ("lamb", "lamb", dict(weight_decay=1e-2, beta1=0.8, beta2=0.99, eps=1e-8),
     dict(weight_decay=1e-2, beta_1=0.8, beta_2=0.99, epsilon=1e-8)),
]


def torch_kwargs(name, core):
    kwargs = dict(core)
    if name == "lamb":
        kwargs["betas"] = (kwargs.pop("beta1"), kwargs.pop("beta2"))
    if name == "clars":
        kwargs.setdefault("estimator", "exact")
    return kwargs


def problem():
    rng = np.random.default_rng(42)
    x = rng.normal(size=(BATCH * STEPS, IN))
    y = rng.integers(0, OUT, size=BATCH * STEPS)
    weights = [
        rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN),  # Keras layout (in, out)
        rng.normal(size=HIDDEN) * 0.1,
        rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN),
        np.zeros(OUT),  # a zero-initialised tensor
    ]
    return x, y, weights


# ---------------------------------------------------------------- NumPy oracle
def numpy_gradients(weights, x, y):
    """Gradients of the mean cross-entropy of the MLP, by hand."""
    w1, b1, w2, b2 = weights
    h = np.tanh(x @ w1 + b1)
    z = h @ w2 + b2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = p.copy()
    dz[np.arange(len(y)), y] -= 1.0
    dz /= len(y)
    da = (dz @ w2.T) * (1.0 - h * h)
    return [x.T @ da, da.sum(axis=0), h.T @ dz, dz.sum(axis=0)]


def numpy_norm_means(weights, x, y, estimator):
    if estimator == "exact":
        parts = [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
    else:
        k = int(estimator.split(":")[1])
        parts = list(zip(np.array_split(x, k), np.array_split(y, k)))
    norms = [[np.linalg.norm(g) for g in numpy_gradients(weights, xp, yp)] for xp, yp in parts]
    return list(np.mean(norms, axis=0))


def run_oracle(name, core, x, y, weights):
    names = ["dense/kernel", "dense/bias", "head/kernel", "head/bias"]
    record = {k: v for k, v in core.items() if k not in ("chunk_size",)}
    oracle = reference.ReferenceOptimizer.for_tensors(
        config.optimizer_config(name, **record), names, [w.shape for w in weights]
    )
    params = [w.copy() for w in weights]
    estimator = core.get("estimator", "exact")
    for step in range(STEPS):
        xb, yb = x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]
        norms = numpy_norm_means(params, xb, yb, estimator) if name == "clars" else None
        params = oracle.step(params, numpy_gradients(params, xb, yb), SCHEDULE(step), grad_norms=norms)
    return params


# ---------------------------------------------------------------- PyTorch
def run_torch(name, core, x, y, weights):
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(weights[0].T))
        model[0].bias.copy_(torch.from_numpy(weights[1]))
        model[2].weight.copy_(torch.from_numpy(weights[2].T))
        model[2].bias.copy_(torch.from_numpy(weights[3]))
    optimizer = create_torch_optimizer(name, model.named_parameters(), lr=SCHEDULE(0), **torch_kwargs(name, core))
    scheduler = GradualWarmupScheduler(optimizer, SCHEDULE)
    loss_fn = torch.nn.functional.cross_entropy
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(STEPS):
        xb, yb = xt[step * BATCH : (step + 1) * BATCH], yt[step * BATCH : (step + 1) * BATCH]
        optimizer.zero_grad()
        loss_fn(model(xb), yb).backward()
        if name == "clars":
            optimizer.add_grad_norms(model, loss_fn, xb, yb)
        optimizer.step()
        scheduler.step()
    return [
        model[0].weight.detach().numpy().T,
        model[0].bias.detach().numpy(),
        model[2].weight.detach().numpy().T,
        model[2].bias.detach().numpy(),
    ]


# ---------------------------------------------------------------- Keras
def run_keras(name, keras_kwargs, x, y, weights):
    previous = keras.backend.floatx()
    previous_policy = global_state.get_global_attribute("dtype_policy", None)
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # Keras caches the policy from floatx on first use
    try:
        inputs = keras.Input((IN,))
        hidden = keras.layers.Dense(HIDDEN, activation="tanh", name="dense")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(OUT, name="head")(hidden))
        model.set_weights(weights)
        if name == "clars":
            model = CLARSModel(model)
        optimizer = create_keras_optimizer(name, learning_rate=SCHEDULE(0), **keras_kwargs)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[callbacks.GradualWarmupCallback(SCHEDULE)])
        assert int(optimizer.iterations.numpy()) == STEPS
        return [v.numpy() for v in model.trainable_variables]
    finally:
        global_state.set_global_attribute("dtype_policy", previous_policy)
        keras.backend.set_floatx(previous)


def relative_error(actual, expected) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


@pytest.mark.parametrize("case_id, name, core, keras_kwargs", CASES, ids=[c[0] for c in CASES])
def test_torch_keras_and_the_oracle_agree(case_id, name, core, keras_kwargs):
    x, y, weights = problem()
    expected = run_oracle(name, core, x, y, weights)
    from_torch = run_torch(name, core, x, y, weights)
    from_keras = run_keras(name, keras_kwargs, x, y, weights)
    moved = max(float(np.max(np.abs(e - w))) for e, w in zip(expected, weights))
    assert moved > 1e-3, "the run must move the weights for the comparison to mean anything"
    for index, (o, t, k) in enumerate(zip(expected, from_torch, from_keras)):
        assert relative_error(t, o) <= RTOL, f"torch vs oracle, tensor {index}"
        assert relative_error(k, o) <= RTOL, f"keras vs oracle, tensor {index}"
        assert relative_error(k, t) <= RTOL, f"keras vs torch, tensor {index}"


def test_clars_with_batchnorm_agrees_between_torch_and_keras():
    """Both hold BatchNorm at the batch's statistics for the per-example gradients (no NumPy oracle here)."""
    x, y, weights = problem()
    gamma, beta = np.linspace(0.5, 1.5, HIDDEN), np.linspace(-0.2, 0.2, HIDDEN)
    kwargs = dict(weight_decay=1e-3, trust_coefficient=0.05, chunk_size=6)

    torch_model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.BatchNorm1d(HIDDEN, eps=1e-5, momentum=0.1), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, OUT),
    ).double()
    with torch.no_grad():
        for tensor, value in zip(
            [torch_model[0].weight, torch_model[0].bias, torch_model[1].weight, torch_model[1].bias,
             torch_model[3].weight, torch_model[3].bias],
            [weights[0].T, weights[1], gamma, beta, weights[2].T, weights[3]],
        ):
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    optimizer = create_torch_optimizer("clars", torch_model.named_parameters(), lr=SCHEDULE(0), **kwargs)
    scheduler = GradualWarmupScheduler(optimizer, SCHEDULE)
    loss_fn = torch.nn.functional.cross_entropy
    torch_model.train()
    for step in range(STEPS):
        xb = torch.from_numpy(x[step * BATCH : (step + 1) * BATCH])
        yb = torch.from_numpy(y[step * BATCH : (step + 1) * BATCH])
        optimizer.zero_grad()
        loss_fn(torch_model(xb), yb).backward()
        optimizer.add_grad_norms(torch_model, loss_fn, xb, yb)
        optimizer.step()
        scheduler.step()
    from_torch = [p.detach().numpy() for p in torch_model.parameters()]
    from_torch[0], from_torch[4] = from_torch[0].T, from_torch[4].T

    previous = keras.backend.floatx()
    previous_policy = global_state.get_global_attribute("dtype_policy", None)
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # Keras caches the policy from floatx on first use
    try:
        inputs = keras.Input((IN,))
        h = keras.layers.Dense(HIDDEN, name="dense")(inputs)
        h = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="batch_normalization")(h)
        h = keras.layers.Activation("tanh")(h)
        inner = keras.Model(inputs, keras.layers.Dense(OUT, name="head")(h))
        inner.set_weights([weights[0], weights[1], gamma, beta, np.zeros(HIDDEN), np.ones(HIDDEN), weights[2], weights[3]])
        model = CLARSModel(inner)
        model.compile(optimizer=create_keras_optimizer("clars", learning_rate=SCHEDULE(0), **kwargs),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[callbacks.GradualWarmupCallback(SCHEDULE)])
        from_keras = [v.numpy() for v in model.trainable_variables]
    finally:
        global_state.set_global_attribute("dtype_policy", previous_policy)
        keras.backend.set_floatx(previous)
    for index, (t, k) in enumerate(zip(from_torch, from_keras)):
        assert relative_error(k, t) <= RTOL, f"keras vs torch, tensor {index}"
