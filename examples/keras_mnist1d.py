"""Large-batch training of a 1-D CNN on MNIST-1D with Horovod and hvd_largebatch (Keras 3, ``model.fit``).

By default: LARS with Goyal et al.'s per-batch gradual warmup
(``GradualWarmupCallback``), i.e. the base LR tuned at batch 128 scaled to the
global batch (square-root rule for the layer-wise optimizers, Goyal's linear
rule for ``--optimizer sgd``), a ramp from the base LR to that peak over the
first epoch, then the LARS paper's poly(2) decay (``sgd``: Goyal's step decay).
``DistributedOptimizer`` averages the gradients over the workers (one grouped
allreduce per step); the callbacks broadcast rank 0's initial weights and
optimizer state and average the epoch metrics.

The script uses only the package's public API; the data come from the
``mnist1d`` package's own generator (rank 0 generates them once into
``--data-dir``, never downloads), and the model is defined here.

Run on 2 local workers:

    horovodrun -np 2 -H localhost:2 python examples/keras_mnist1d.py
    horovodrun -np 2 -H localhost:2 python examples/keras_mnist1d.py --optimizer lamb --batch-size 8192
    horovodrun -np 2 -H localhost:2 python examples/keras_mnist1d.py --smoke      # seconds, tiny data

Only rank 0 prints (Keras's per-epoch line).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

from hvd_largebatch import schedules
from hvd_largebatch.tf import CLARSModel, DistributedOptimizer, callbacks, create_optimizer

# Base LRs at batch 128, as tuned for `hvd-largebatch bench` (LARC uses LARS's).
BASE_LR = {"lars": 8.0, "larc": 8.0, "clars": 8.0, "lamb": 0.02, "sgd": 0.1}
BASE_BATCH = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=tuple(BASE_LR), default="lars", help="default: lars")
    parser.add_argument("--batch-size", type=int, default=2048, help="global batch (all workers), default: 2048")
    parser.add_argument("--epochs", type=int, default=10, help="default: 10")
    parser.add_argument("--base-lr", type=float, default=None, help=f"LR at batch {BASE_BATCH} (default: tuned)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="gradual warmup length, default: 1")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (LAMB: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=60_000, help="MNIST-1D training examples, default: 60000")
    parser.add_argument("--test-size", type=int, default=10_000, help="MNIST-1D test examples, default: 10000")
    parser.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "mnist1d"),
                        help="where the generated MNIST-1D is kept, default: ~/.cache/mnist1d")
    parser.add_argument("--smoke", action="store_true", help="tiny data, 3 epochs, batch 256: checks that it all runs")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.batch_size, args.warmup_epochs = 3, 256, 0.5
        args.train_size, args.test_size = 2048, 512
    return args


def mnist1d(train_size: int, test_size: int, data_dir: str) -> tuple[np.ndarray, ...]:
    """MNIST-1D (signals of length 40, 10 classes) from the mnist1d package's generator, cached as a pickle."""
    from mnist1d.data import get_dataset, get_dataset_args

    args = get_dataset_args()
    args.num_samples = -(-(train_size + test_size) // 10) * 10  # the generator makes num_samples/10 per class
    args.train_split = 1.0  # split exactly below
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"mnist1d-{args.num_samples}-seed{args.seed}.pkl")
    data = get_dataset(args, path=path, download=False, verbose=False)
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    return x[:train_size], y[:train_size], x[train_size:train_size + test_size], y[train_size:train_size + test_size]


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
    args = parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:  # one core's worth of threads per worker when they share a machine
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    hvd.init()
    rank, workers = hvd.rank(), hvd.size()

    if args.batch_size % workers or not 0 < args.batch_size <= args.train_size:
        raise SystemExit(f"--batch-size must be a multiple of {workers} workers and at most --train-size")
    # Data: every rank holds the same arrays; rank 0 generates and caches them first.
    if rank == 0:
        mnist1d(args.train_size, args.test_size, args.data_dir)
    hvd.broadcast_object(None, name="data_ready")  # a barrier: wait for rank 0's cache file
    x_train, y_train, x_test, y_test = mnist1d(args.train_size, args.test_size, args.data_dir)
    x_test, y_test = x_test[rank::workers], y_test[rank::workers]  # each rank scores its part of the test set
    batches = ShardedEpochs(x_train, y_train, args.batch_size, args.seed, rank, workers)

    # Model, optimizer and schedule, as the large-batch papers do it.
    keras.utils.set_random_seed(args.seed)
    model = mnist1d_convnet(seed=args.seed)
    if args.optimizer == "clars":  # CLARS needs per-example gradient norms: the wrapper measures them
        model = CLARSModel(model)
    base_lr = args.base_lr if args.base_lr is not None else BASE_LR[args.optimizer]
    if args.optimizer == "sgd":
        # Goyal et al.: linear scaling, gradual warmup from the base LR, step decay at Goyal's
        # epochs 30, 60, 80 of 90 taken as fractions of this run (those after the warmup).
        milestones = [f * args.epochs for f in (1 / 3, 2 / 3, 8 / 9) if f * args.epochs > args.warmup_epochs]
        schedule = schedules.goyal(
            base_lr, BASE_BATCH, args.batch_size, batches.steps_per_epoch, epochs=args.epochs,
            warmup_epochs=args.warmup_epochs, milestones=milestones,
        )
    else:
        # Layer-wise methods: the same gradual warmup (Goyal's per-iteration ramp from the base
        # LR), square-root scaling and the LARS paper's poly(2) decay, as in `hvd-largebatch bench`.
        schedule = schedules.lars_poly(
            base_lr, BASE_BATCH, args.batch_size, batches.steps_per_epoch, args.epochs,
            warmup_epochs=args.warmup_epochs, scaling="sqrt",
        )
    weight_decay = args.weight_decay if args.weight_decay is not None else (0.01 if args.optimizer == "lamb" else 5e-4)
    optimizer = create_optimizer(args.optimizer, learning_rate=schedule(0), weight_decay=weight_decay)
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
