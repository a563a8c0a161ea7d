"""Large-batch training of a 1-D CNN on MNIST-1D with Horovod and hvd_largebatch (Keras 3, ``model.fit``).

By default: LARS with Goyal et al.'s per-batch gradual warmup
(``GradualWarmupCallback``), i.e. the base LR tuned at batch 128 scaled to the
global batch (square-root rule for the layer-wise optimizers, Goyal's linear
rule for ``--optimizer sgd``), a ramp from the base LR to that peak over the
first epoch, then the LARS paper's poly(2) decay (``sgd``: Goyal's step decay).
``DistributedOptimizer`` averages the gradients over the workers (one grouped
allreduce per step); the callbacks broadcast rank 0's initial weights and
optimizer state and average the epoch metrics.

Run on 2 local workers (MNIST-1D is generated once and cached, never downloaded):

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
from hvd_largebatch.data import MNIST1DSpec, ShardedBatches, load_mnist1d, shard_of
from hvd_largebatch.recipes import BASE_LRS
from hvd_largebatch.tf import CLARSModel, DistributedOptimizer, callbacks, create_optimizer
from hvd_largebatch.tf.models import mnist1d_convnet

OPTIMIZERS = ("lars", "larc", "clars", "lamb", "sgd")
# Base LRs at batch 128, as tuned for `hvd-largebatch bench` (LARC uses LARS's).
BASE_LR = {name: BASE_LRS["lars" if name == "larc" else name] for name in OPTIMIZERS}
BASE_BATCH = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="lars", help="default: lars")
    parser.add_argument("--batch-size", type=int, default=2048, help="global batch (all workers), default: 2048")
    parser.add_argument("--epochs", type=int, default=10, help="default: 10")
    parser.add_argument("--base-lr", type=float, default=None, help=f"LR at batch {BASE_BATCH} (default: tuned)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="gradual warmup length, default: 1")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (LAMB: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch, batch 256: checks that it all runs")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.batch_size, args.warmup_epochs = 1, 256, 0.5
    return args


class ShardedEpochs(keras.utils.PyDataset):
    """This worker's part of every global batch, epoch after epoch, in an order shared by all workers."""

    def __init__(self, x: np.ndarray, y: np.ndarray, shards: ShardedBatches):
        super().__init__()
        self.x, self.y, self.shards, self.epoch = x, y, shards, 0

    def __len__(self) -> int:
        return self.shards.steps_per_epoch

    def __getitem__(self, step: int):
        rows = self.shards.indices(self.epoch, step)
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1


def main() -> int:
    args = parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:  # one core's worth of threads per worker when they share a machine
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    hvd.init()
    rank, workers = hvd.rank(), hvd.size()

    # Data: every rank holds the same arrays; rank 0 generates and caches them first.
    spec = MNIST1DSpec(train_size=2048, test_size=512) if args.smoke else MNIST1DSpec()
    if rank == 0:
        load_mnist1d(spec, log=print)
    hvd.broadcast_object(None, name="data_ready")  # a barrier: wait for rank 0's cache file
    data = load_mnist1d(spec)
    shards = ShardedBatches(len(data.x_train), args.batch_size, rank, workers, seed=args.seed)
    x_test, y_test = shard_of(data.x_test, rank, workers), shard_of(data.y_test, rank, workers)

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
            base_lr, BASE_BATCH, args.batch_size, shards.steps_per_epoch, epochs=args.epochs,
            warmup_epochs=args.warmup_epochs, milestones=milestones,
        )
    else:
        # Layer-wise methods: the same gradual warmup (Goyal's per-iteration ramp from the base
        # LR), square-root scaling and the LARS paper's poly(2) decay, as in `hvd-largebatch bench`.
        schedule = schedules.lars_poly(
            base_lr, BASE_BATCH, args.batch_size, shards.steps_per_epoch, args.epochs,
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
              f"({shards.per_worker_batch} per worker, {shards.steps_per_epoch} steps/epoch); {schedule.describe()}")
    history = model.fit(
        ShardedEpochs(data.x_train, data.y_train, shards),
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
