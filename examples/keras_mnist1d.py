"""Large-batch training of a 1-D CNN on MNIST-1D with Horovod and hvd_largebatch (Keras 3, ``model.fit``).

By default: LARS with Goyal et al.'s per-batch gradual warmup
(``GradualWarmupCallback``), i.e. the base LR tuned at batch 128 scaled to the
global batch (square-root rule for the layer-wise optimizers, Goyal's linear
rule for ``--optimizer sgd``), a ramp from the base LR to that peak over the
first epoch, then the LARS paper's poly(2) decay (``sgd``: Goyal's step decay).
``DistributedOptimizer`` averages the gradients over the workers (one grouped
allreduce per step); the callbacks broadcast rank 0's initial weights and
optimizer state and average the epoch metrics.

The model (the Keras twin of the PyTorch example's, with PyTorch's initial
law), a ``PyDataset`` of this rank's shares of the global batches and the
``fit`` call are written here with the package's public API; the command line,
MNIST-1D and the LR recipe come from ``mnist1d_recipe.py`` beside this script.

Run on 2 local workers:

    horovodrun -np 2 -H localhost:2 python examples/keras_mnist1d.py
    horovodrun -np 2 -H localhost:2 python examples/keras_mnist1d.py --optimizer lamb --batch-size 8192
    horovodrun -np 2 -H localhost:2 python examples/keras_mnist1d.py --smoke      # seconds, tiny data

Only rank 0 prints (Keras's per-epoch line).
"""

from __future__ import annotations

import math
import os
import sys

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

from hvd_largebatch.tf import CLARSModel, DistributedOptimizer, callbacks, create_optimizer
from mnist1d_recipe import check_batch_size, load_mnist1d, lr_schedule, parse_args, weight_decay

def mnist1d_convnet(seed: int) -> keras.Model:
    """Three Conv1D-BatchNorm-ReLU blocks (32, 64, 64 channels; length 40 -> 40 -> 20 -> 10) and a classifier.

    Kernels start from PyTorch's default law, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in the PyTorch example.
    """
    def init(index: int) -> keras.initializers.Initializer:
        return keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform", seed=seed * 100 + index)

    layers = [keras.Input(shape=(40,)), keras.layers.Reshape((40, 1))]
    for index, (filters, kernel, stride) in enumerate(((32, 5, 1), (64, 3, 2), (64, 3, 2))):
        layers += [
            keras.layers.Conv1D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                kernel_initializer=init(index), name=f"conv{index + 1}"),
            keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{index + 1}"),
            keras.layers.ReLU(),
        ]
    bound = 1 / math.sqrt(64 * 10)  # the classifier's fan-in
    bias_init = keras.initializers.RandomUniform(-bound, bound, seed=seed * 100 + 4)
    layers += [keras.layers.Flatten(), keras.layers.Dense(10, kernel_initializer=init(3), bias_initializer=bias_init,
                                                          name="fc")]
    return keras.Sequential(layers, name="mnist1d_convnet")


class ShardedEpochs(keras.utils.PyDataset):
    """This worker's share of every global batch, epoch after epoch, in an order shared by all workers.

    All workers draw the same epoch order (seeded by ``seed`` and the epoch), cut it into global
    batches and take their own slice of each, so together they train on exactly the global batch.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, global_batch: int, seed: int, rank: int, workers: int):
        super().__init__()
        self.x, self.y, self.global_batch, self.seed, self.epoch = x, y, global_batch, seed, 0
        self.per_worker_batch = global_batch // workers
        self.offset = rank * self.per_worker_batch
        self.steps_per_epoch = len(x) // global_batch
        self.order = np.random.default_rng([seed, 0]).permutation(len(x))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __getitem__(self, step: int):
        start = step * self.global_batch + self.offset
        rows = self.order[start : start + self.per_worker_batch]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))


def main() -> int:
    args = parse_args(__doc__.split("\n\n")[0])
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:  # one core's worth of threads per worker when they share a machine
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    hvd.init()
    rank, workers = hvd.rank(), hvd.size()

    check_batch_size(args, workers)
    # Data: the whole training set and this rank's part of the test set; rank 0 generates and caches them first.
    x_train, y_train, x_test, y_test = load_mnist1d(
        args, rank, workers, barrier=lambda: hvd.broadcast_object(None, name="data_ready")
    )
    batches = ShardedEpochs(x_train, y_train, args.batch_size, args.seed, rank, workers)

    # Model, optimizer and schedule, as the large-batch papers do it.
    keras.utils.set_random_seed(args.seed)
    model = mnist1d_convnet(seed=args.seed)
    if args.optimizer == "clars":  # CLARS needs per-example gradient norms: the wrapper measures them
        model = CLARSModel(model)
    schedule = lr_schedule(args, batches.steps_per_epoch)  # gradual warmup, then poly(2) (sgd: Goyal's steps)
    optimizer = create_optimizer(args.optimizer, learning_rate=schedule(0), weight_decay=weight_decay(args))
    model.compile(
        optimizer=DistributedOptimizer(optimizer),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=False,  # Horovod's allreduce has no XLA kernel
    )
    if rank == 0:
        print(f"{args.optimizer} on {workers} workers: global batch {args.batch_size} "
              f"({batches.per_worker_batch} per worker, {batches.steps_per_epoch} steps/epoch); {schedule.describe()}")
    history = model.fit(
        batches,
        epochs=args.epochs,
        validation_data=(x_test, y_test),  # each rank scores its part; MetricAverageCallback averages
        callbacks=[
            callbacks.BroadcastGlobalVariablesCallback(root_rank=0),
            # The LR of every batch from the schedule: Goyal's ramp, then the decay.
            callbacks.GradualWarmupCallback(schedule) if schedule.warmup_steps
            else callbacks.LearningRateScheduleCallback(schedule),
            callbacks.MetricAverageCallback(),
        ],
        verbose=2 if rank == 0 else 0,
    )
    accuracy, loss = history.history["val_accuracy"][-1], history.history["loss"][-1]
    if rank == 0:
        print(f"final test accuracy {100 * accuracy:.2f}%")
    return 0 if math.isfinite(loss) else 1


if __name__ == "__main__":
    sys.exit(main())
