"""Worker for tests/parallel/test_mixed_precision_parallel.py: Keras mixed precision under horovodrun, one launch.

Every rank runs every check with ``model.fit`` and writes numbers with ``write_results``:

* ``overflow/...``: the ``mixed_float16`` policy, ``DistributedLossScaleOptimizer``;
  on one step only rank 1's batch holds a value beyond float16 (its local
  gradients are NaN). Reported: how many updates the optimizer applied, the
  loss scale, the weights' digest and non-finite count;
* ``unscaled/lars``: a clean ``mixed_float16`` fit against the same fit in float32;
* ``bfloat16/lamb``: ``mixed_bfloat16`` trains;
* ``refused``: the message ``model.compile`` raises for DistributedOptimizer under ``mixed_float16``;
* ``compression/<name>``: ``compression="fp16"`` against the uncompressed fit.

Usage: horovodrun -np 2 -H localhost:2 --gloo python mixed_precision_keras_worker.py
"""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from hvd_largebatch.tf import (  # noqa: E402
    CLARS,
    LAMB,
    LARS,
    SGD,
    CLARSModel,
    DistributedLossScaleOptimizer,
    DistributedOptimizer,
    callbacks,
)
from launcher import write_results  # noqa: E402

LOCAL_BATCH = 8
STEPS = 4
FEATURES, CLASSES = 6, 3
OVERFLOW_BATCH = 2  # the local batch (on rank 1) whose input overflows float16
INITIAL_SCALE = 2.0**15
OPTIMIZERS = {
    "sgd": lambda: SGD(learning_rate=0.1, weight_decay=1e-3),
    "lars": lambda: LARS(learning_rate=2.0, weight_decay=1e-3, trust_coefficient=0.02),
    "clars": lambda: CLARS(learning_rate=2.0, weight_decay=1e-3, trust_coefficient=0.02, estimator="microbatch:2"),
    "lamb": lambda: LAMB(learning_rate=0.01),
}


def make_model(seed: int, clars: bool = False) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    x = keras.layers.Dense(16, name="dense")(inputs)
    x = keras.layers.Activation("tanh")(x)
    outputs = keras.layers.Dense(CLASSES, name="head", dtype="float32")(x)  # float32 logits, as Keras advises
    model = keras.Model(inputs, outputs)
    return CLARSModel(model) if clars else model


def local_data(batches: int = STEPS):
    rng = np.random.default_rng(10 + hvd.rank())
    x = rng.normal(size=(batches * LOCAL_BATCH, FEATURES)).astype("float32")
    y = ((x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64))
    return x, y


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digest(variables) -> str:
    h = hashlib.sha256()
    for v in variables:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(v)).tobytes())
    return h.hexdigest()


def nonfinite(variables) -> int:
    return int(sum(np.sum(~np.isfinite(keras.ops.convert_to_numpy(v).astype(np.float64))) for v in variables))


def relative_difference(a, b) -> float:
    return max(
        float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
              / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-300))
        for x, y in zip(a, b)
    )


def weights(model: keras.Model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v).copy() for v in model.trainable_variables]


def fit(model: keras.Model, optimizer, x, y, epochs: int = 1):
    model.compile(optimizer=optimizer, loss=loss(), jit_compile=False)
    history = model.fit(
        x, y, batch_size=LOCAL_BATCH, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[callbacks.BroadcastGlobalVariablesCallback(0)],
    )
    return history.history["loss"]


def dtypes(variables) -> list[str]:
    return sorted({keras.backend.standardize_dtype(v.dtype) for v in variables})


def overflow_check(name: str, passes: int) -> dict:
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = local_data(STEPS * passes)
    if hvd.rank() == 1:
        x[OVERFLOW_BATCH * LOCAL_BATCH, 0] = 1e6  # inf once cast to float16: this rank's gradients are NaN
    model = make_model(seed=3 + hvd.rank())
    optimizer = DistributedLossScaleOptimizer(
        DistributedOptimizer(OPTIMIZERS[name](), backward_passes_per_step=passes), initial_scale=INITIAL_SCALE
    )
    fit(model, optimizer, x, y)
    inner = optimizer.inner_optimizer.inner_optimizer
    overflowed = hvd.allgather_object(bool(np.any(np.abs(x) > np.finfo(np.float16).max)))
    result = {
        "digest": digest(model.trainable_variables + optimizer.variables),
        "updates": int(inner.iterations.numpy()),
        "expected_updates": STEPS,
        "loss_scale": float(optimizer.dynamic_scale.numpy()),
        "initial_scale": INITIAL_SCALE,
        "nonfinite": nonfinite(model.trainable_variables + inner.variables),
        "rank_overflowed_locally": overflowed,
        "variable_dtypes": dtypes(model.trainable_variables),
        "slot_dtypes": dtypes([v for v in inner.variables if "float" in str(v.dtype)]),
    }
    keras.mixed_precision.set_global_policy("float32")
    return result


def unscaled_check() -> dict:
    x, y = local_data()
    start = weights(make_model(seed=3))
    keras.mixed_precision.set_global_policy("mixed_float16")
    mixed = make_model(seed=3 + hvd.rank())
    optimizer = DistributedLossScaleOptimizer(DistributedOptimizer(OPTIMIZERS["lars"]()), initial_scale=INITIAL_SCALE)
    fit(mixed, optimizer, x, y)
    keras.mixed_precision.set_global_policy("float32")
    full = make_model(seed=3 + hvd.rank())
    fit(full, DistributedOptimizer(OPTIMIZERS["lars"]()), x, y)
    return {
        "digest": digest(mixed.trainable_variables + optimizer.variables),
        "vs_float32": relative_difference(weights(mixed), weights(full)),
        "float32_moved": relative_difference(weights(full), start),
        "loss_scale": float(optimizer.dynamic_scale.numpy()),
        "initial_scale": INITIAL_SCALE,
    }


def bfloat16_check() -> dict:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    x, y = local_data()
    model = make_model(seed=3 + hvd.rank())
    optimizer = DistributedOptimizer(LAMB(learning_rate=0.02))
    losses = fit(model, optimizer, x, y, epochs=6)
    keras.mixed_precision.set_global_policy("float32")
    inner = optimizer.inner_optimizer
    return {
        "digest": digest(model.trainable_variables + optimizer.variables),
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
        "optimizer_type": type(model.optimizer).__name__,
        "nonfinite": nonfinite(model.trainable_variables + inner.variables),
        "variable_dtypes": dtypes(model.trainable_variables),
        "slot_dtypes": dtypes([v for v in inner.variables if "float" in str(v.dtype)]),
    }


def refused_check() -> str:
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = make_model(seed=3)
    try:
        model.compile(optimizer=DistributedOptimizer(LARS()), loss=loss(), jit_compile=False)
        message = "compiled without error"
    except ValueError as error:
        message = str(error)
    keras.mixed_precision.set_global_policy("float32")
    return message


def compression_check(name: str) -> dict:
    x, y = local_data()
    clars = name == "clars"
    start = weights(make_model(seed=3, clars=clars))
    compressed = make_model(seed=3 + hvd.rank(), clars=clars)
    optimizer = DistributedOptimizer(OPTIMIZERS[name](), compression="fp16")
    fit(compressed, optimizer, x, y)
    plain = make_model(seed=3 + hvd.rank(), clars=clars)
    fit(plain, DistributedOptimizer(OPTIMIZERS[name]()), x, y)
    return {
        "digest": digest(compressed.trainable_variables + optimizer.variables),
        "vs_uncompressed": relative_difference(weights(compressed), weights(plain)),
        "moved": relative_difference(weights(plain), start),
        "nonfinite": nonfinite(compressed.trainable_variables + optimizer.variables),
    }


def main() -> None:
    hvd.init()
    results = {"rank": hvd.rank(), "size": hvd.size()}
    results["overflow/lars"] = overflow_check("lars", passes=1)
    results["overflow/lamb_accumulate2"] = overflow_check("lamb", passes=2)
    results["unscaled/lars"] = unscaled_check()
    results["bfloat16/lamb"] = bfloat16_check()
    results["refused"] = refused_check()
    for name in OPTIMIZERS:
        results[f"compression/{name}"] = compression_check(name)
    write_results(hvd.rank(), results)


if __name__ == "__main__":
    main()
