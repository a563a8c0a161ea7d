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
    assert [r["rank"] for r in results] == list(range(len(results))) and results[0]["size"] == 2
    for key in ("torch", "torch_cnn", "keras", "keras_snapshot"):
        assert results[0][key] == results[1][key], key  # bit-identical


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
    assert not np.allclose(results[0]["torch_cnn_main_mean"], results[1]["torch_cnn_main_mean"])
