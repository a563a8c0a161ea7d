"""Two hosts of two ranks each on this one machine (``-H localhost:2,127.0.0.1:2``), Gloo, both frameworks.

The package's evidence that it runs across nodes: Horovod sees two nodes
(local_size 2, cross_size 2, ranks 0-1 on ``localhost`` and 2-3 on
``127.0.0.1``); with ``HOROVOD_HIERARCHICAL_ALLREDUCE=1`` and without, four
ranks training on their parts of every global batch with the package's
LARS end with identical weights and optimizer state, equal to one process on
the concatenated batch. (Horovod turns hierarchical allreduce off unless it
is built with NCCL or DDL, so on CPU both settings run the flat ring; the
test runs both so that a build where the setting takes effect is covered.)

Both frameworks' launches also check the elastic state's first sync for every
package optimizer with weight decay (no drift, no state seeded), torch beside
Horovod's ``TorchState`` on the same setup (which drifts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher import run_under_horovod

WORKER = Path(__file__).with_name("topology_worker.py")
HOSTS = "localhost:2,127.0.0.1:2"
SINGLE_PROCESS_TOLERANCE = {"torch": 1e-9, "keras": 1e-12}  # float64, only the summation order differs
WEIGHT_DECAY_OPTIMIZERS = ("sgd", "lars", "larc", "clars", "lamb")


LAUNCHES = [("torch", "0"), ("torch", "1"), ("keras", "0"), ("keras", "1")]
_launched: dict[tuple[str, str], list[dict]] = {}


def results_of(framework: str, hierarchical: str, tmp_path_factory) -> list[dict]:
    """One launch per (framework, hierarchical) for the whole module."""
    key = (framework, hierarchical)
    if key not in _launched:
        directory = tmp_path_factory.mktemp(f"topology_{framework}")
        env = {"HOROVOD_HIERARCHICAL_ALLREDUCE": hierarchical}
        _launched[key] = run_under_horovod(
            WORKER, framework, str(directory), np=4, hosts=HOSTS, timeout=600, env=env
        )
    return _launched[key]


@pytest.mark.parametrize("framework,hierarchical", LAUNCHES)
def test_two_hosts_of_two_ranks(framework, hierarchical, tmp_path_factory):
    results = results_of(framework, hierarchical, tmp_path_factory)
    seen = [
        (r["rank"], r["size"], r["local_rank"], r["local_size"], r["cross_rank"], r["cross_size"], r["hostname"])
        for r in results
    ]
    assert seen == [
        (0, 4, 0, 2, 0, 2, "localhost"),
        (1, 4, 1, 2, 0, 2, "localhost"),
        (2, 4, 0, 2, 1, 2, "127.0.0.1"),
        (3, 4, 1, 2, 1, 2, "127.0.0.1"),
    ]
    assert {r["hierarchical_allreduce_env"] for r in results} == {hierarchical}


@pytest.mark.parametrize("framework,hierarchical", LAUNCHES)
def test_lars_on_two_hosts_equals_one_process_and_ranks_are_identical(framework, hierarchical, tmp_path_factory):
    results = results_of(framework, hierarchical, tmp_path_factory)
    keys = [k for k in results[0] if k.startswith(("average/", "fit/"))]
    assert keys, "the worker ran no training check"
    for key in keys:
        checksums = [r[key]["checksum"] for r in results]
        assert all(c == checksums[0] for c in checksums), (key, checksums)
        assert max(r[key]["max_abs_vs_rank0"] for r in results) == 0.0, (key, [r[key] for r in results])
        for result in results:
            assert result[key]["vs_single_process"] <= SINGLE_PROCESS_TOLERANCE[framework], (key, result[key])
            assert result[key]["moved"] > 1e-4, (key, result[key])


@pytest.mark.parametrize("name", WEIGHT_DECAY_OPTIMIZERS)
def test_elastic_first_sync_takes_no_step(name, tmp_path_factory):
    results = results_of("torch", "0", tmp_path_factory)
    ours = [r[f"first_sync/{name}"] for r in results]
    horovods = [r[f"horovod_first_sync/{name}"] for r in results]
    assert ours[0]["weight_decay"] > 0, ours[0]
    for result in ours:
        assert result["drift"] == 0.0 and result["state_entries"] == 0, ours
    assert len({r["digest"] for r in ours}) == 1, ours
    # the same check catches Horovod's zero-gradient step (the trap the elastic state avoids);
    # for CLARS that step cannot even run (it has no per-example gradient norms)
    if name == "clars":
        assert all("per-example gradient norms" in r["error"] for r in horovods), horovods
    else:
        assert all(r["drift"] > 0 for r in horovods), horovods


@pytest.mark.parametrize("name", WEIGHT_DECAY_OPTIMIZERS)
def test_keras_elastic_first_sync_takes_no_step(name, tmp_path_factory):
    results = results_of("keras", "0", tmp_path_factory)
    synced = [r[f"first_sync/{name}"] for r in results]
    assert synced[0]["weight_decay"] > 0, synced[0]
    for result in synced:
        assert result["drift"] == 0.0 and result["slots_nonzero"] == 0 and result["iterations"] == 0, synced
    assert len({r["digest"] for r in synced}) == 1, synced
