"""Horovod elastic training in both frameworks: a worker dies mid-epoch, its host comes back (2 -> 1 -> 2).

One elastic launch per framework (Gloo, ``--host-discovery-script`` with ``localhost:1``
and ``127.0.0.1:1`` as two hosts, ``--blacklist-cooldown-range 1 2``) runs
``elastic_torch_worker.py`` (the package's ElasticState with LARS in its
DistributedOptimizer) or ``elastic_keras_worker.py`` (the same under
``model.fit`` with ``hvd_largebatch.tf.elastic``, two backward passes per
update, arrays, ``tf.data`` and ``PyDataset`` inputs, the host back in the
middle of an epoch); the plans are in the workers' docstrings. From what the
survivor and the newcomer return, the test checks that:

* the job did every planned update: each epoch's global batches add up to
  the data set, over the world sizes 2, 1 and 2 (a silent early return fails);
* the survivor's restore gave back the last commit bit for bit, and the
  update that no commit covered is not in the log;
* the first sync and the newcomer's sync left rank 0 unchanged and gave the
  newcomer exactly rank 0's state; all ranks were identical after every
  update made by two workers;
* every example was trained on exactly once per epoch;
* the LR of every update is the recipe's for that update's global batch;
* Keras: every update was whole (no commit between micro-batches), the
  restore after a worker died mid-update started a whole update again,
  and the tf.data and PyDataset epochs resumed mid-epoch on another world size.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hvd_largebatch.schedules import ElasticSchedule
from launcher import run_elastic_under_horovod

WORKERS = {framework: Path(__file__).with_name(f"elastic_{framework}_worker.py") for framework in ("torch", "keras")}
DISCOVERY = """#!/bin/sh
echo localhost:1
[ -f {directory}/host_down ] || echo 127.0.0.1:1
"""


#: framework -> what its one elastic launch returned (both fixtures below share a launch).
_LAUNCHES: dict[str, list] = {}


def launch(framework, tmp_path_factory):
    if framework not in _LAUNCHES:
        directory = tmp_path_factory.mktemp(f"elastic_{framework}")
        script = directory / "hosts.sh"
        script.write_text(DISCOVERY.format(directory=directory))
        script.chmod(0o755)
        started = time.monotonic()
        _LAUNCHES[framework] = run_elastic_under_horovod(
            WORKERS[framework], str(directory), discovery_script=script, np=2, min_np=1, max_np=2, cooldown=(1, 2),
            timeout=900, env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "300"},  # a newcomer's TensorFlow start-up can take a minute
        )
        print(f"elastic {framework} launch: {time.monotonic() - started:.1f} s")
    return _LAUNCHES[framework]


@pytest.fixture(scope="module", params=["torch", "keras"])
def results(request, tmp_path_factory):
    return launch(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def keras_results(tmp_path_factory):
    return launch("keras", tmp_path_factory)


def test_survivor_and_newcomer_finished_on_two_hosts(results):
    assert [(r["rank"], r["size"], r["hostname"]) for r in results] == [(0, 2, "localhost"), (1, 2, "127.0.0.1")]
    # the newcomer got the whole committed log with the state
    assert results[0]["log"] == results[1]["log"]
    assert results[0]["final_digest"] == results[1]["final_digest"]


def test_every_planned_update_was_done_across_2_1_2_workers(results):
    log, first = results[0]["log"], results[0]
    per_epoch = {}
    for entry in log:
        per_epoch.setdefault(entry["epoch"], []).append(entry)
    assert sorted(per_epoch) == list(range(first["epochs"]))
    for epoch, entries in per_epoch.items():
        assert sum(e["global_batch"] for e in entries) == first["dataset_size"], epoch
        done = [e["examples_done"] for e in entries]
        assert done == [sum(e["global_batch"] for e in entries[:i]) for i in range(len(entries))], epoch
    sizes = [e["size"] for e in log]
    changes = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert changes == [2, 1, 2], sizes
    assert [e["examples_seen"] for e in log] == [sum(e["global_batch"] for e in log[:i]) for i in range(len(log))]
    assert first["examples_seen"] == first["epochs"] * first["dataset_size"]
    planned = {
        "torch": 8 + 2 + 12 + 8,  # 8 updates of 8, 2 of 8 committed before the failure, 12 of 4 after it, 8 of 8
        "keras": 8 + 2 + 12 + 4 + 6,  # the same to epoch 2, which has 4 updates of 4 and, with the host back, 6 of 8
    }
    assert len(log) == planned[first["framework"]]


def test_restore_gives_back_the_last_commit_bit_for_bit(results):
    restores = [e for e in results[0]["events"] if e["event"] == "restore"]
    assert len(restores) == 1, results[0]["events"]
    assert restores[0]["digest"] == restores[0]["committed"]
    # the worker died before update FAIL_AT_UPDATE; the last commit covered the updates before it, in steps of commit_every
    assert restores[0]["updates"] == results[0]["fail_at_update"] - results[0]["fail_at_update"] % results[0]["commit_every"]


def test_syncs_are_exact_and_ranks_identical_while_two_are_alive(results):
    survivor, newcomer = results
    for event in survivor["events"]:
        if event["event"] == "sync" and event["rank"] == 0:
            assert event["before"] == event["after"], event  # rank 0 is never moved by a sync
    joined = [e for e in newcomer["events"] if e["event"] == "sync"]
    assert len(joined) == 1 and joined[0]["size"] == 2
    root = [e for e in survivor["events"] if e["event"] == "sync" and e["updates"] == joined[0]["updates"] and e["size"] == 2]
    assert root and joined[0]["after"] == root[-1]["after"]
    for entry in survivor["log"]:
        assert len(set(entry["digests"])) == 1, entry
        assert len(entry["digests"]) == entry["size"]


def test_each_example_once_per_epoch(results):
    first = results[0]
    for epoch in range(first["epochs"]):
        indices = [i for e in first["log"] if e["epoch"] == epoch for i in e["indices"]]
        assert sorted(indices) == list(range(first["dataset_size"])), epoch


def test_lr_of_every_update_is_the_recipe_for_its_global_batch(results):
    first = results[0]
    recipe = ElasticSchedule.from_config(first["recipe"])
    got = [(e["examples_seen"], e["global_batch"], e["lr"]) for e in first["log"]]
    assert got == [(e, b, recipe.lr(e, b)) for e, b, _ in got]
    per_update = first["per_worker_batch"] * first.get("backward_passes_per_step", 1)
    assert {e["global_batch"] for e in first["log"]} == {per_update, 2 * per_update}


def test_keras_updates_whole_and_inputs_resumed_mid_epoch_on_another_world(keras_results):
    # Keras only: the torch worker's loop feeds its batches itself.
    first = keras_results[0]
    assert first["framework"] == "keras"
    log = first["log"]
    assert {e["passes_into_update"] for e in log} == {0}  # logged (and committed) at update boundaries only
    assert [e["iterations"] for e in log] == list(range(1, len(log) + 1))  # one optimizer update per logged update
    restore = [e for e in first["events"] if e["event"] == "restore"][0]
    # the worker died after the first of two micro-batches: the survivor's restore starts a whole update again
    assert (restore["passes_after"], restore["accumulated_after"]) == (0, 0.0)
    sizes_by_input = {}
    for entry in log:
        sizes_by_input.setdefault(entry["input"], []).append(entry["size"])
    assert {kind: sorted(set(sizes)) for kind, sizes in sizes_by_input.items()} == {
        "arrays": [2], "tf.data": [1, 2], "PyDataset": [1, 2],
    }
    # tf.data: two workers, then one; PyDataset: one worker, then two (a mid-epoch change each way)
    assert sizes_by_input["tf.data"] == sorted(sizes_by_input["tf.data"], reverse=True)
    assert sizes_by_input["PyDataset"] == sorted(sizes_by_input["PyDataset"])
