"""Worker for tests/parallel/test_keras_parallel.py: every check of hvd_largebatch.tf in one horovodrun launch.

Every rank runs every check with ``model.fit`` and writes its results with
``write_results``. The global data set is known to all ranks; rank r fits on
its part of every global batch (``shuffle=False``), and each rank also fits a
single-process reference on the whole data with the global batch size, so the
test can compare "k ranks on their parts" with "one process on the
concatenated batches" without another launch. Ranks start from different
random weights; BroadcastGlobalVariablesCallback must give everyone rank 0's,
which the reference reproduces from rank 0's seed. Everything is float64.
Workers write numbers (checksums, maximum absolute differences to rank 0 or
to a single process, per-rank values), never verdicts, so that the test
compares them and a failure shows what differed.

BatchNorm statistics: after an epoch on rank-dependent data each rank holds
its own; ``average_batchnorm_statistics`` and the ``AverageBatchNormStatistics``
callback make them equal, and equal to the mean of the ranks' values.

Usage: horovodrun -np 2 -H localhost:2 --gloo python keras_worker.py CHECKPOINT_DIR
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_largebatch import schedules  # noqa: E402
from hvd_largebatch.tf import (  # noqa: E402
    CLARS,
    LAMB,
    LARS,
    SGD,
    AverageBatchNormStatistics,
    CLARSModel,
    DistributedOptimizer,
    average_batchnorm_statistics,
    batchnorm_moving_statistics,
    callbacks,
)
from keras_noise_scale_checks import run_checks as noise_scale_checks  # noqa: E402
from launcher import write_results  # noqa: E402

LOCAL_BATCH = 8
STEPS_PER_EPOCH = 4
EPOCHS = 2
FEATURES, CLASSES = 6, 3
SCHEDULE = schedules.make_schedule(0.05, EPOCHS * STEPS_PER_EPOCH, peak=0.2, warmup_steps=4, decay="linear", end_lr=0.02)

# name: (optimizer factory, CLARS estimator of the distributed run or None, backward passes)
FITS = {
    "lars": (lambda: LARS(learning_rate=1.0, weight_decay=1e-3, trust_coefficient=0.02), None, 1),
    "lamb": (lambda: LAMB(learning_rate=1.0), None, 1),
    "sgd": (lambda: SGD(learning_rate=1.0, weight_decay=1e-3, nesterov=True), None, 1),
    "keras_sgd": (lambda: keras.optimizers.SGD(learning_rate=1.0, momentum=0.875), None, 1),
    "keras_adam": (lambda: keras.optimizers.Adam(learning_rate=1.0), None, 1),
    "clars_exact": (lambda **kw: CLARS(learning_rate=1.0, trust_coefficient=0.02, chunk_size=3, **kw), "exact", 1),
    "clars_microbatch": (lambda **kw: CLARS(learning_rate=1.0, trust_coefficient=0.02, **kw), "microbatch:2", 1),
    "accumulate2_lars": (lambda: LARS(learning_rate=1.0, weight_decay=1e-3, trust_coefficient=0.02), None, 2),
    "accumulate2_lamb": (lambda: LAMB(learning_rate=1.0), None, 2),
    "native_lars": (lambda: LARS(learning_rate=1.0, weight_decay=1e-3, trust_coefficient=0.02, fused="native"), None, 1),
    "native_lamb": (lambda: LAMB(learning_rate=1.0, fused="native"), None, 1),
}


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def model(seed: int, batchnorm: bool = False) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    x = keras.layers.Dense(8, name="dense")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="batch_normalization")(x)
    x = keras.layers.Activation("tanh")(x)
    outputs = keras.layers.Dense(CLASSES, name="head")(x)
    return keras.Model(inputs, outputs)


def global_data(passes: int):
    """The data of ``EPOCHS`` epochs of ``STEPS_PER_EPOCH`` global batches (of ``passes`` local batches per rank)."""
    global_batch = hvd.size() * LOCAL_BATCH * passes
    rng = np.random.default_rng(2024)
    x = rng.normal(size=(STEPS_PER_EPOCH * global_batch, FEATURES))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y, global_batch


def shard(array, global_batch: int, passes: int):
    """Rank r's part of every global batch: ``passes`` consecutive local batches of ``LOCAL_BATCH``."""
    part = LOCAL_BATCH * passes
    rank = hvd.rank()
    return np.concatenate([array[s + rank * part : s + (rank + 1) * part] for s in range(0, len(array), global_batch)])


def flat_values(variables) -> np.ndarray:
    """Every value of ``variables`` (weights, slots, counters) in one float64 vector."""
    parts = [np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64).ravel() for v in variables]
    return np.concatenate(parts) if parts else np.zeros(0)


def digest(variables) -> str:
    """sha256 of every value of ``variables`` (equal on two ranks only if bit-identical)."""
    return hashlib.sha256(flat_values(variables).tobytes()).hexdigest()


def checksum(variables) -> list[float]:
    """``[count, sum, sum of squares]`` of every value: equal variables give equal checksums, a failure shows them."""
    values = flat_values(variables)
    return [float(values.size), float(values.sum()), float((values * values).sum())]


def max_abs_vs_rank0(variables, name: str) -> float:
    """max |values - rank 0's values| (rank 0's vector is broadcast; every rank's has the same length)."""
    values = flat_values(variables)
    root = hvd.broadcast(tf.constant(values), root_rank=0, name=name).numpy()
    return float(np.max(np.abs(values - root))) if values.size else 0.0


def relative_difference(variables, reference) -> float:
    return max(
        float(np.linalg.norm(a.numpy() - b.numpy()) / max(np.linalg.norm(b.numpy()), 1e-300))
        for a, b in zip(variables, reference)
    )


class RecordBatches(keras.callbacks.Callback):
    """Per batch: the optimizer step it belongs to (update count at its start) and the LR logged for it."""

    def __init__(self):
        super().__init__()
        self.rows = []
        self._step = None

    def on_train_batch_begin(self, batch, logs=None):
        self._step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append([self._step, float(logs["learning_rate"])])


def fit_check(name: str) -> dict:
    factory, estimator, passes = FITS[name]
    x, y, global_batch = global_data(passes)
    xs, ys = shard(x, global_batch, passes), shard(y, global_batch, passes)

    distributed = model(seed=100 + hvd.rank())
    if estimator is None:
        optimizer, reference_optimizer = factory(), factory()
    else:
        distributed = CLARSModel(distributed)
        optimizer = factory(estimator=estimator)
        # k micro-batches on each of the n ranks cover the global batch as k * n do in one process
        if estimator == "exact":
            reference_optimizer = factory(estimator="exact")
        else:
            reference_optimizer = factory(estimator=f"microbatch:{int(estimator.split(':')[1]) * hvd.size()}")
    distributed.compile(
        optimizer=DistributedOptimizer(optimizer, backward_passes_per_step=passes), loss=loss(), jit_compile=False
    )
    record = RecordBatches()
    history = distributed.fit(
        xs,
        ys,
        batch_size=LOCAL_BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[callbacks.BroadcastGlobalVariablesCallback(0), callbacks.GradualWarmupCallback(SCHEDULE), record],
    )

    reference = model(seed=100)  # rank 0's initial weights
    if estimator is not None:
        reference = CLARSModel(reference)
    reference.compile(optimizer=reference_optimizer, loss=loss(), jit_compile=False)
    start = [v.numpy().copy() for v in reference.trainable_variables]
    reference.fit(
        x, y, batch_size=global_batch, epochs=EPOCHS, shuffle=False, verbose=0,
        callbacks=[callbacks.GradualWarmupCallback(SCHEDULE)],
    )
    inner = distributed.optimizer.inner_optimizer
    everything = distributed.variables + distributed.optimizer.variables
    return {
        "max_abs_vs_rank0": max_abs_vs_rank0(everything, f"fit.{name}"),
        "checksum": checksum(everything),
        "vs_single_process": relative_difference(distributed.trainable_variables, reference.trainable_variables),
        "optimizer_vs_single_process": relative_difference(
            [v for v in inner.variables if v.dtype == "float64"],
            [v for v in reference.optimizer.variables if v.dtype == "float64"],
        ),
        "moved": max(float(np.max(np.abs(v.numpy() - s))) for v, s in zip(distributed.trainable_variables, start)),
        "updates": int(inner.iterations.numpy()),
        "reference_updates": int(reference.optimizer.iterations.numpy()),
        "lr_per_batch": record.rows,
        "logged_epoch_lr": history.history["learning_rate"],
    }


def metric_average_check() -> dict:
    """Two identical trainings, with and without MetricAverageCallback; only the logged numbers differ."""
    x, y, global_batch = global_data(1)
    xs, ys = shard(x, global_batch, 1), shard(y, global_batch, 1)
    validation = (xs[:16], ys[:16])  # rank-dependent validation data
    histories = {}
    for averaged in (True, False):
        m = model(seed=100 + hvd.rank())
        m.compile(optimizer=DistributedOptimizer(LARS(learning_rate=0.5)), loss=loss(), metrics=["accuracy"])
        extra = [callbacks.MetricAverageCallback()] if averaged else []
        history = m.fit(
            xs, ys, batch_size=LOCAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0, validation_data=validation,
            callbacks=[callbacks.BroadcastGlobalVariablesCallback(0), *extra],
        )
        histories["averaged" if averaged else "local"] = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    return histories


class CaptureAtFirstBatch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.state = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.state is None:
            self.state = checksum(self.model.variables + self.model.optimizer.variables)


def broadcast_check() -> dict:
    """Rank-dependent weights and optimizer state before fit; rank 0's everywhere after the broadcast."""
    x, y, global_batch = global_data(1)
    m = model(seed=100 + hvd.rank(), batchnorm=True)
    optimizer = LARS(learning_rate=0.1 * (hvd.rank() + 1))
    m.compile(optimizer=DistributedOptimizer(optimizer), loss=loss())
    m.optimizer.build(m.trainable_variables)
    for slot in optimizer.momentums:
        slot.assign(keras.ops.full(slot.shape, float(hvd.rank() + 1)))
    optimizer.prev_learning_rate.assign(0.3 * (hvd.rank() + 1))
    for v in m.non_trainable_variables:  # BatchNorm statistics too
        v.assign(v + float(hvd.rank()))
    before = checksum(m.variables + m.optimizer.variables)
    capture = CaptureAtFirstBatch()
    m.fit(
        shard(x, global_batch, 1), shard(y, global_batch, 1), batch_size=LOCAL_BATCH, epochs=1, shuffle=False,
        verbose=0, callbacks=[callbacks.BroadcastGlobalVariablesCallback(0), capture],
    )
    trainable_and_state = m.trainable_variables + m.optimizer.variables
    return {
        "before": before,
        "at_first_batch": capture.state,
        "after_training_max_abs_vs_rank0": max_abs_vs_rank0(trainable_and_state, "broadcast.after"),
        "batchnorm_statistics_max_abs_vs_rank0": max_abs_vs_rank0(m.non_trainable_variables, "broadcast.bn"),
    }


class StatisticsAtValidation(keras.callbacks.Callback):
    """The checksum of the BatchNorm statistics when fit's validation starts."""

    def __init__(self):
        super().__init__()
        self.checksums = []

    def on_test_begin(self, logs=None):
        self.checksums.append(checksum(batchnorm_moving_statistics(self.model)))


def batchnorm_average_check() -> dict:
    """Local BatchNorm statistics after an epoch on rank-dependent data, then averaged; then the callback in fit."""
    x, y, global_batch = global_data(1)
    xs, ys = shard(x, global_batch, 1), shard(y, global_batch, 1)
    m = model(seed=100 + hvd.rank(), batchnorm=True)
    m.compile(optimizer=DistributedOptimizer(LARS(learning_rate=0.1)), loss=loss(), jit_compile=False)
    m.fit(xs, ys, batch_size=LOCAL_BATCH, epochs=1, shuffle=False, verbose=0,
          callbacks=[callbacks.BroadcastGlobalVariablesCallback(0)])
    statistics = batchnorm_moving_statistics(m)
    local = flat_values(statistics).tolist()
    count = average_batchnorm_statistics(m)
    averaged = flat_values(statistics).tolist()
    at_validation, average = StatisticsAtValidation(), AverageBatchNormStatistics()
    m.fit(xs, ys, batch_size=LOCAL_BATCH, epochs=1, shuffle=False, verbose=0, validation_data=(xs[:16], ys[:16]),
          callbacks=[average, at_validation])
    return {
        "layers": count,
        "local": local,
        "averaged": averaged,
        "checksum_at_validation": at_validation.checksums,
        "averaged_epochs": average.averaged_epochs,
        "after_fit_max_abs_vs_rank0": max_abs_vs_rank0(statistics, "bn_average.after_fit"),
    }


def jit_check() -> dict:
    """jit_compile=True with DistributedOptimizer: refused before the first step, or when the step is traced."""
    x, y, global_batch = global_data(1)
    messages = {}
    for with_broadcast in (True, False):
        m = model(seed=100)
        m.compile(optimizer=DistributedOptimizer(LARS()), loss=loss(), jit_compile=True)
        extra = [callbacks.BroadcastGlobalVariablesCallback(0)] if with_broadcast else []
        try:
            m.fit(x[:16], y[:16], batch_size=LOCAL_BATCH, epochs=1, verbose=0, callbacks=extra)
            messages[str(with_broadcast)] = None
        except ValueError as err:
            messages[str(with_broadcast)] = str(err)
    return messages


def barrier(name: str) -> None:
    hvd.allreduce(tf.constant(0.0, tf.float64), name=name)


def resume_check(directory: Path) -> dict:
    """Rank 0 saves after epoch 1; every rank loads, broadcasts and continues; equals an uninterrupted run."""
    factory, _, _ = FITS["lars"]
    x, y, global_batch = global_data(1)
    xs, ys = shard(x, global_batch, 1), shard(y, global_batch, 1)

    def fresh():
        m = model(seed=100 + hvd.rank())
        m.compile(optimizer=DistributedOptimizer(factory()), loss=loss(), jit_compile=False)
        return m

    def fit(m, epochs, initial_epoch=0):
        m.fit(
            xs, ys, batch_size=LOCAL_BATCH, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0,
            callbacks=[callbacks.BroadcastGlobalVariablesCallback(0), callbacks.GradualWarmupCallback(SCHEDULE)],
        )

    straight = fresh()
    fit(straight, EPOCHS)
    first = fresh()
    fit(first, 1)
    path = directory / "resume.keras"
    if hvd.rank() == 0:
        first.save(path)
    barrier("saved")
    loaded = keras.models.load_model(path)
    fit(loaded, EPOCHS, initial_epoch=1)
    return {
        "loaded_type": f"{type(loaded.optimizer).__name__}({type(loaded.optimizer.inner_optimizer).__name__})",
        "vs_uninterrupted": relative_difference(
            loaded.variables + loaded.optimizer.variables, straight.variables + straight.optimizer.variables
        ),
        "max_abs_vs_rank0": max_abs_vs_rank0(loaded.variables + loaded.optimizer.variables, "resume"),
    }


def main() -> None:
    directory = Path(sys.argv[1])
    hvd.init()
    keras.backend.set_floatx("float64")
    results = {"rank": hvd.rank(), "size": hvd.size(), "schedule": SCHEDULE.to_config()}
    for name in FITS:
        results[f"fit/{name}"] = fit_check(name)
    results["metric_average"] = metric_average_check()
    results["broadcast"] = broadcast_check()
    results["batchnorm_average"] = batchnorm_average_check()
    results["jit"] = jit_check()
    results["resume"] = resume_check(directory)
    results.update(noise_scale_checks())
    write_results(hvd.rank(), results)


if __name__ == "__main__":
    main()
