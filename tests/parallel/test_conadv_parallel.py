"""ConAdv under horovodrun -np 2 (Gloo and MPI), PyTorch and Keras: ranks stay identical and equal one
process trained on the concatenated batches (the adversarial term is part of the averaged gradient)."""

from pathlib import Path

import numpy as np
import pytest

from launcher import run_under_horovod

WORKER = Path(__file__).with_name("conadv_worker.py")


@pytest.fixture(scope="module", params=["gloo", "mpi"])
def results(request):
    return run_under_horovod(WORKER, backend=request.param, np=2)


def test_ranks_end_with_identical_weights(results):
    assert [(r["rank"], r["size"]) for r in results] == [(rank, len(results)) for rank in range(len(results))]
    for key in ("torch", "torch_cnn", "keras", "keras_snapshot"):
        for rank, result in enumerate(results[1:], start=1):  # bit-identical to rank 0; a failure shows the values
            np.testing.assert_array_equal(result[key], results[0][key], err_msg=f"{key}: rank {rank} vs rank 0")


def test_equals_one_process_on_the_concatenated_batch(results):
    for result in results:
        np.testing.assert_allclose(result["torch"], result["torch_single"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(result["keras"], result["keras_single"], rtol=1e-10, atol=1e-12)


def test_training_moved_the_weights_and_bn_statistics_stay_local(results):
    # Guards against a run that trained nothing, and shows what Horovod does not average:
    # BatchNorm running statistics are per rank (each saw its own clean batches).
    first = results[0]
    assert np.abs(np.asarray(first["torch"]) - np.asarray(first["torch_initial"])).max() > 1e-3
    assert np.abs(np.asarray(first["keras"]) - np.asarray(first["keras_snapshot"])).max() > 1e-6
    means = [r["torch_cnn_main_mean"] for r in results]
    assert not np.allclose(means[0], means[1]), means
