"""Smoke test of the Horovod build: torch and TensorFlow allreduce average over 2 ranks, Gloo and MPI."""

from pathlib import Path

import pytest

from launcher import run_under_horovod

WORKER = Path(__file__).with_name("allreduce_worker.py")


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_allreduce_returns_the_average_on_every_rank(backend, framework):
    results = run_under_horovod(WORKER, framework, backend=backend, np=2)
    size = len(results)
    # Rank r sends (r + 1) * [0, 1, 2, 3]; the average multiplies the ramp by mean(r + 1).
    mean_factor = sum(r + 1 for r in range(size)) / size
    expected = [mean_factor * i for i in range(4)]
    for rank, result in enumerate(results):
        assert (result["rank"], result["size"]) == (rank, size)
        assert result["average"] == pytest.approx(expected, rel=1e-12)
        assert (result["mpi_built"], result["gloo_built"]) == (True, True)
