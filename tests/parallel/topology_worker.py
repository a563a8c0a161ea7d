"""Worker for tests/parallel/test_topology.py: two "hosts" of two ranks each, one framework per launch.

Launched as ``horovodrun -np 4 -H localhost:2,127.0.0.1:2 --gloo python topology_worker.py FRAMEWORK DIR``
(``localhost`` and ``127.0.0.1`` are two host names of this machine, so
Horovod builds a two-node topology: local_size 2, cross_size 2). Every rank
reports its place in the topology and reruns the concatenated-batch check of
the framework's parallel worker with the package's LARS (plus LAMB/CLARS for
torch). Both launches also check the elastic state's first sync for every
package optimizer with weight decay: weights and state exactly rank 0's, no
step taken; torch beside Horovod's own ``TorchState.sync()`` on the same
setup (which moves the weights; the test shows that difference so a real
drift cannot pass unseen).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
FRAMEWORK = sys.argv[1]


def topology(hvd) -> dict:
    return {
        "rank": hvd.rank(),
        "size": hvd.size(),
        "local_rank": hvd.local_rank(),
        "local_size": hvd.local_size(),
        "cross_rank": hvd.cross_rank(),
        "cross_size": hvd.cross_size(),
        "hostname": os.environ.get("HOROVOD_HOSTNAME"),
        "hierarchical_allreduce_env": os.environ.get("HOROVOD_HIERARCHICAL_ALLREDUCE", ""),
    }


def torch_main() -> None:
    import horovod.torch as hvd
    import torch

    import torch_worker
    from hvd_largebatch.schedules import ElasticSchedule
    from hvd_largebatch.torch_impl import DistributedOptimizer, create_optimizer
    from hvd_largebatch.torch_impl.elastic import ElasticLRScheduler, ElasticState
    from launcher import write_results

    hvd.init()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    results = topology(hvd)
    for name in ("lars", "lamb", "clars"):
        results[f"average/{name}"] = torch_worker.check_average_equals_concatenated_batch(name, passes=1)

    recipe = ElasticSchedule(base_lr=0.1, base_batch=8, total_examples=640, warmup_examples=64)

    def first_sync(name: str, horovod_state: bool) -> dict:
        model = torch_worker.mlp(seed=hvd.rank())
        opt = DistributedOptimizer(create_optimizer(name, model.named_parameters(), **torch_worker.OPTIMIZERS[name]))
        sched = ElasticLRScheduler(opt, recipe, per_worker_batch=8, world_size=hvd.size())
        root_before = [p.detach().clone() for p in torch_worker.mlp(seed=0).parameters()]
        if horovod_state:
            try:
                hvd.elastic.TorchState(model, opt).sync()
            except RuntimeError as error:  # CLARS: Horovod's zero-gradient step has no per-example norms
                return {"error": str(error)}
        else:
            ElasticState(model, opt, sched, dataset_size=64).sync()
        return {
            "drift": max(float((p - q).abs().max()) for p, q in zip(model.parameters(), root_before)),
            "state_entries": len(opt.state_dict()["state"]),
            "weight_decay": opt.param_groups[0]["weight_decay"],
            "digest": torch_worker.digest_of(model, opt),
        }

    for name in ("sgd", "lars", "larc", "clars", "lamb"):
        results[f"first_sync/{name}"] = first_sync(name, horovod_state=False)
        results[f"horovod_first_sync/{name}"] = first_sync(name, horovod_state=True)
    write_results(hvd.rank(), results)


def keras_main(directory: Path) -> None:
    import horovod.tensorflow as hvd
    import keras

    import keras_worker
    from launcher import write_results

    hvd.init()
    keras.backend.set_floatx("float64")
    results = topology(hvd)
    results["fit/lars"] = keras_worker.fit_check("lars")

    from hvd_largebatch.schedules import ElasticSchedule
    from hvd_largebatch.tf import DistributedOptimizer, create_optimizer
    from hvd_largebatch.tf.elastic import ElasticState

    recipe = ElasticSchedule(base_lr=0.1, base_batch=8, total_examples=640, warmup_examples=64)
    for name in ("sgd", "lars", "larc", "clars", "lamb"):
        model = keras_worker.model(seed=100 + hvd.rank())
        model.compile(optimizer=DistributedOptimizer(create_optimizer(name, learning_rate=0.1, weight_decay=1e-3)),
                      loss=keras_worker.loss(), jit_compile=False)
        root_before = [v.numpy() for v in keras_worker.model(seed=100).variables]
        state = ElasticState(model, recipe, per_worker_batch=8, dataset_size=64)
        state.sync()
        results[f"first_sync/{name}"] = {
            "drift": max(float(abs(v.numpy() - r).max()) for v, r in zip(model.variables, root_before)),
            "slots_nonzero": sum(int((keras.ops.convert_to_numpy(v) != 0).any())
                                 for v in model.optimizer.inner_optimizer.variables
                                 if v.dtype == "float64" and len(v.shape) > 0),
            "iterations": int(model.optimizer.iterations.numpy()),
            "weight_decay": float(model.optimizer.inner_optimizer.core_config.weight_decay),
            "digest": keras_worker.digest(state.variables()),
        }
    write_results(hvd.rank(), results)


if __name__ == "__main__":
    if FRAMEWORK == "torch":
        torch_main()
    elif FRAMEWORK == "keras":
        keras_main(Path(sys.argv[2]))
    else:
        raise SystemExit(f"framework must be torch or keras, got {FRAMEWORK!r}")
