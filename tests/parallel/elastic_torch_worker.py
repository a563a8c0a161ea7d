"""Worker for tests/parallel/test_elastic_torch.py: elastic training through a failure and a host that comes back.

Launched by the test in Horovod elastic mode with two one-slot hosts,
``localhost`` and ``127.0.0.1``, found by a discovery script that leaves
``127.0.0.1`` out while the file ``DIR/host_down`` exists. The plan:

* epoch 0 on two workers; in epoch 1, in the middle of an update that no
  commit has covered yet, the worker on ``127.0.0.1`` creates ``host_down``
  and dies (once: ``DIR/failed`` marks it done). The survivor restores the
  last commit, the world becomes one worker, the global batch halves and so
  does the LR's peak; the epoch continues with the examples not yet seen;
* at the start of epoch 2 the survivor removes ``host_down`` and commits
  until Horovod reports the host back (after its blacklist cooldown); a new
  worker joins, gets rank 0's exact state, and the last epoch runs on two.

The elastic state's committed extras carry a log of every update (the epoch,
the examples done before it, the examples seen, the global batch, the LR
used, the indices every rank trained on, and every rank's digest of weights,
optimizer and scheduler after it), so rolled-back updates vanish from it
and a newcomer receives it with the state. Each process also records its
restores and syncs with digests. Every process that ends writes its results.

Usage: see test_elastic_torch.py (needs ``horovodrun --host-discovery-script``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F

import torch_worker
from hvd_largebatch.schedules import ElasticSchedule
from hvd_largebatch.torch_impl import LARS, DistributedOptimizer
from hvd_largebatch.torch_impl.elastic import ElasticLRScheduler, ElasticState
from launcher import write_results

DIRECTORY = Path(sys.argv[1])
DATASET_SIZE, PER_WORKER_BATCH, EPOCHS, COMMIT_EVERY = 64, 4, 3, 2
FAIL_AT_UPDATE = 11  # epoch 1, third update; the last commit was after update 10
RECIPE = ElasticSchedule.from_epochs(
    0.05, 4, examples_per_epoch=DATASET_SIZE, epochs=EPOCHS, warmup_epochs=1, decay="step", milestones=(2,)
)
HOSTNAME = os.environ.get("HOROVOD_HOSTNAME", "")


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(DATASET_SIZE, 6, generator=generator, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def state_digest(state: ElasticState) -> str:
    digest = hashlib.sha256(torch_worker.digest_of(state.model, state.optimizer).encode())
    digest.update(repr(sorted(state.scheduler.state_dict().items())).encode())
    return digest.hexdigest()


class RecordingState(ElasticState):
    """The package's state, recording each restore and sync with digests (what the test compares)."""

    def __init__(self, *args, **kwargs):
        self.events: list[dict] = []
        self.committed_digest = None
        super().__init__(*args, **kwargs)

    def save(self):
        super().save()
        self.committed_digest = state_digest(self)

    def restore(self):
        super().restore()
        self.events.append({"event": "restore", "digest": state_digest(self), "committed": self.committed_digest,
                            "updates": self.updates})

    def sync(self):
        before = state_digest(self)
        super().sync()
        self.events.append({"event": "sync", "size": hvd.size(), "rank": hvd.rank(), "before": before,
                            "after": state_digest(self), "updates": self.updates, "lr": self.scheduler.get_last_lr()[0]})


def maybe_fail(state: ElasticState) -> None:
    if HOSTNAME == "127.0.0.1" and state.updates == FAIL_AT_UPDATE and not (DIRECTORY / "failed").exists():
        (DIRECTORY / "host_down").touch()
        (DIRECTORY / "failed").touch()
        os._exit(17)


def wait_for_host_back(state: ElasticState) -> None:
    """At the start of epoch 2 on one worker: let the host come back and commit until Horovod reports it."""
    if hvd.size() != 1 or state.epoch != 2:
        return
    (DIRECTORY / "host_down").unlink(missing_ok=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state.commit()  # raises HostsUpdatedInterrupt once the host is back: elastic.run resets
        time.sleep(0.2)
    raise RuntimeError("the host did not come back within 120 s")


def main() -> None:
    hvd.init()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    x, y = data()
    model = torch_worker.mlp(seed=100 + hvd.rank())
    optimizer = DistributedOptimizer(LARS(model.named_parameters(), lr=0.05, weight_decay=1e-3, trust_coefficient=0.02))
    scheduler = ElasticLRScheduler(optimizer, RECIPE, per_worker_batch=PER_WORKER_BATCH, world_size=hvd.size())
    state = RecordingState(model, optimizer, scheduler, dataset_size=DATASET_SIZE, commit_every=COMMIT_EVERY,
                           seed=3, log=[])

    @hvd.elastic.run
    def train(state: RecordingState) -> None:
        while state.epoch < EPOCHS:
            wait_for_host_back(state)
            for indices in state.batches():
                maybe_fail(state)
                entry = {
                    "epoch": state.epoch,
                    "examples_done": state.examples_done,
                    "examples_seen": scheduler.examples_seen,
                    "global_batch": scheduler.global_batch,
                    "size": hvd.size(),
                    "lr": optimizer.param_groups[0]["lr"],
                }
                index = torch.as_tensor(indices)
                optimizer.zero_grad()
                F.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
                scheduler.step()
                gathered = hvd.allgather_object((indices.tolist(), state_digest(state)), name="elastic_test.log")
                entry["indices"] = [i for part, _ in gathered for i in part]
                entry["digests"] = [d for _, d in gathered]
                state.log.append(entry)
                state.update_done()
            state.next_epoch()

    train(state)
    write_results(hvd.rank(), {
        "framework": "torch",
        "rank": hvd.rank(),
        "size": hvd.size(),
        "hostname": HOSTNAME,
        "log": state.log,
        "events": state.events,
        "final_digest": state_digest(state),
        "examples_seen": scheduler.examples_seen,
        "recipe": RECIPE.to_config(),
        "per_worker_batch": PER_WORKER_BATCH,
        "dataset_size": DATASET_SIZE,
        "epochs": EPOCHS,
        "fail_at_update": FAIL_AT_UPDATE,
        "commit_every": COMMIT_EVERY,
    })


if __name__ == "__main__":
    np.seterr(all="raise")
    main()
