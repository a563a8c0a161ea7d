"""Worker for test_allreduce_smoke: one torch and one TensorFlow allreduce per rank.

Each rank contributes ``rank + 1`` (times a ramp), so the average over ``size``
ranks is known in closed form and the test computes it from rank and size.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import horovod.tensorflow as hvd_tf  # noqa: E402
import horovod.torch as hvd_torch  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

from launcher import write_results  # noqa: E402

hvd_torch.init()
hvd_tf.init()
rank, size = hvd_torch.rank(), hvd_torch.size()

torch_avg = hvd_torch.allreduce(torch.arange(4, dtype=torch.float64) * (rank + 1), op=hvd_torch.Average)
tf_avg = hvd_tf.allreduce(tf.range(4, dtype=tf.float64) * (rank + 1), op=hvd_tf.Average)

write_results(
    rank,
    {
        "rank": rank,
        "size": size,
        "tf_rank": hvd_tf.rank(),
        "tf_size": hvd_tf.size(),
        "mpi_built": hvd_torch.mpi_built(),
        "gloo_built": hvd_torch.gloo_built(),
        "torch": torch_avg.tolist(),
        "tf": tf_avg.numpy().tolist(),
    },
)
