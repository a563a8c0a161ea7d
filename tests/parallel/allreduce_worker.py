"""Worker for test_allreduce_smoke: one allreduce per rank in torch or in TensorFlow.

Usage: ``allreduce_worker.py torch|tensorflow``. One framework per launch: the
two frameworks' Horovod libraries each start their own background loop and
Gloo context, which must not share a job. Each rank contributes
``(rank + 1) * [0, 1, 2, 3]``, so the test computes the average from rank and size.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launcher import write_results  # noqa: E402


def torch_allreduce() -> dict:
    import horovod.torch as hvd
    import torch

    hvd.init()
    average = hvd.allreduce(torch.arange(4, dtype=torch.float64) * (hvd.rank() + 1), op=hvd.Average)
    return {"rank": hvd.rank(), "size": hvd.size(), "average": average.tolist(),
            "mpi_built": hvd.mpi_built(), "gloo_built": hvd.gloo_built()}


def tensorflow_allreduce() -> dict:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    average = hvd.allreduce(tf.range(4, dtype=tf.float64) * (hvd.rank() + 1), op=hvd.Average)
    return {"rank": hvd.rank(), "size": hvd.size(), "average": average.numpy().tolist(),
            "mpi_built": hvd.mpi_built(), "gloo_built": hvd.gloo_built()}


if __name__ == "__main__":
    framework = sys.argv[1]
    result = {"torch": torch_allreduce, "tensorflow": tensorflow_allreduce}[framework]()
    write_results(result["rank"], result)
