"""Worker for tests/parallel/test_elastic_keras.py: Keras elastic training through a failure and a host that comes back.

The plan of elastic_torch_worker.py (read its docstring), under
``model.fit`` with the package's LARS in its ``DistributedOptimizer``
(grouped allreduce, two backward passes per update) and
``hvd_largebatch.tf.elastic``, with another input each epoch:

* epoch 0, arrays, on two workers;
* epoch 1, a ``tf.data.Dataset``: the worker on ``127.0.0.1`` dies between
  commits, after the first micro-batch of an update (its gradients are
  accumulated on both workers, the update is not done); the survivor
  restores the last commit and continues the epoch alone;
* epoch 2, a ``keras.utils.PyDataset`` of two-example items: after four
  updates alone the survivor lets the host come back (mid-epoch), a new
  worker joins and the epoch ends on two.

A recording callback puts every update (position, global batch, LR used,
input, every rank's indices and digest) into the state's committed log.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_largebatch.schedules import ElasticSchedule  # noqa: E402
from hvd_largebatch.tf import LARS, DistributedOptimizer, elastic  # noqa: E402
from launcher import write_results  # noqa: E402

DIRECTORY = Path(sys.argv[1])
DATASET_SIZE, PER_WORKER_BATCH, PASSES, EPOCHS, COMMIT_EVERY = 64, 2, 2, 3, 2
FAIL_AT_UPDATE = 11  # epoch 1, third update, second micro-batch; the last commit was after update 10
HOST_BACK_AT = 16  # examples done of epoch 2 when the survivor lets the host come back
INPUTS = ("arrays", "tf.data", "PyDataset")  # by epoch
RECIPE = ElasticSchedule.from_epochs(
    0.05, 4, examples_per_epoch=DATASET_SIZE, epochs=EPOCHS, warmup_epochs=1, decay="step", milestones=(2,)
)
HOSTNAME = os.environ.get("HOROVOD_HOSTNAME", "")


def data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(DATASET_SIZE, 6))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


def build_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh", name="dense")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    optimizer = DistributedOptimizer(LARS(learning_rate=0.05, weight_decay=1e-3, trust_coefficient=0.02),
                                     backward_passes_per_step=PASSES)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    return model


class Pairs(keras.utils.PyDataset):
    """Item ``i``: examples ``2i`` and ``2i + 1``."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x) // 2

    def __getitem__(self, i):
        return self.x[2 * i:2 * i + 2], self.y[2 * i:2 * i + 2]


def epoch_input(epoch: int, x, y) -> dict:
    kind = INPUTS[epoch]
    if kind == "tf.data":
        return {"x": tf.data.Dataset.from_tensor_slices((x, y))}
    if kind == "PyDataset":
        return {"x": Pairs(x, y)}
    return {"x": x, "y": y}


def passes_into_update(state) -> int:
    return int(keras.ops.convert_to_numpy(state.distributed.local_passes)) % PASSES


def state_digest(state: elastic.ElasticState) -> str:
    digest = hashlib.sha256()
    for variable in state.variables():
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)).tobytes())
    digest.update(repr((state.examples_seen, state.global_batch)).encode())
    return digest.hexdigest()


class RecordingState(elastic.ElasticState):
    def __init__(self, *args, **kwargs):
        self.events: list[dict] = []
        self.committed_digest = None
        super().__init__(*args, **kwargs)

    def save(self):
        super().save()
        self.committed_digest = state_digest(self)

    def restore(self):
        super().restore()
        accumulated = sum(float(np.abs(keras.ops.convert_to_numpy(a)).sum())
                          for a in self.distributed.accumulated_gradients)
        self.events.append({"event": "restore", "digest": state_digest(self), "committed": self.committed_digest,
                            "updates": self.updates, "passes_after": passes_into_update(self),
                            "accumulated_after": accumulated})

    def sync(self):
        before = state_digest(self)
        super().sync()
        self.events.append({"event": "sync", "size": hvd.size(), "rank": hvd.rank(), "before": before,
                            "after": state_digest(self), "updates": self.updates})


class RecordUpdates(keras.callbacks.Callback):
    """Fails and brings the host back on schedule; after each update, logs it into the state (before its commit)."""

    def __init__(self, state: RecordingState):
        super().__init__()
        self.state = state

    def on_train_batch_begin(self, batch, logs=None):
        state = self.state
        micro = batch % PASSES
        if (HOSTNAME == "127.0.0.1" and state.updates == FAIL_AT_UPDATE and micro == 1
                and not (DIRECTORY / "failed").exists()):
            (DIRECTORY / "host_down").touch()
            (DIRECTORY / "failed").touch()
            os._exit(17)
        if hvd.size() == 1 and state.epoch == 2 and state.examples_done == HOST_BACK_AT and micro == 0:
            (DIRECTORY / "host_down").unlink(missing_ok=True)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                state.commit()  # raises HostsUpdatedInterrupt once Horovod sees the host back
                time.sleep(0.2)
            raise RuntimeError("the host did not come back within 120 s")

    def on_train_batch_end(self, batch, logs=None):
        state = self.state
        if (batch + 1) % PASSES:
            return  # a micro-batch: no update yet
        per_update = state.examples_per_update()
        update = batch // PASSES
        mine = state.fit_indices[update * per_update:(update + 1) * per_update].tolist()
        entry = {
            "epoch": state.epoch,
            "examples_done": state.examples_done,
            "examples_seen": state.examples_seen,
            "global_batch": state.global_batch,
            "size": hvd.size(),
            "input": INPUTS[state.epoch],
            "lr": float(keras.ops.convert_to_numpy(state.optimizer.learning_rate)),
            "iterations": int(keras.ops.convert_to_numpy(state.optimizer.iterations)),
            "passes_into_update": passes_into_update(state),
        }
        gathered = hvd.allgather_object((mine, state_digest(state)), name="elastic_test.log")
        entry["indices"] = [i for part, _ in gathered for i in part]
        entry["digests"] = [d for _, d in gathered]
        state.log.append(entry)


def main() -> None:
    hvd.init()
    keras.backend.set_floatx("float64")
    x, y = data()
    model = build_model(seed=100 + hvd.rank())
    state = RecordingState(model, RECIPE, per_worker_batch=PER_WORKER_BATCH, dataset_size=DATASET_SIZE,
                           commit_every=COMMIT_EVERY, seed=3, log=[])

    @elastic.run
    def train(state: RecordingState) -> None:
        while state.epoch < EPOCHS:
            state.fit(**epoch_input(state.epoch, x, y), epochs=state.epoch + 1, verbose=0,
                      callbacks=[RecordUpdates(state)])

    train(state)
    write_results(hvd.rank(), {
        "framework": "keras",
        "rank": hvd.rank(),
        "size": hvd.size(),
        "hostname": HOSTNAME,
        "log": state.log,
        "events": state.events,
        "final_digest": state_digest(state),
        "examples_seen": state.examples_seen,
        "recipe": RECIPE.to_config(),
        "per_worker_batch": PER_WORKER_BATCH,
        "backward_passes_per_step": PASSES,
        "dataset_size": DATASET_SIZE,
        "epochs": EPOCHS,
        "fail_at_update": FAIL_AT_UPDATE,
        "commit_every": COMMIT_EVERY,
    })


if __name__ == "__main__":
    main()
