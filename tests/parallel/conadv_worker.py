"""Worker for test_conadv_parallel: ConAdv + LARS + DistributedOptimizer on 2 ranks, PyTorch and Keras.

Every rank trains on its own slice of each global batch (rank r takes rows
[r*b, (r+1)*b)), then, in the same process, trains a single-process copy on
the concatenated global batches with the same optimizer unwrapped. The models
have no BatchNorm: per-rank batch statistics differ from the concatenated
batch's, so only a BatchNorm-free model can equal the single-process run
exactly. The attack is then per-example; random_start_prob=0 and untargeted
mode make it deterministic, so the adversarial batch of the global run is the
concatenation of the ranks' adversarial batches.

A second torch check trains a dual-BatchNorm CNN with the default random,
targeted attack and a rank-dependent seed: the ranks must still end with
identical parameters (gradients, adversarial term included, are averaged).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import horovod.tensorflow as hvd_tf  # noqa: E402
import horovod.torch as hvd_torch  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import keras  # noqa: E402
from hvd_largebatch.tf import LARS as KerasLARS  # noqa: E402
from hvd_largebatch.tf import DistributedOptimizer as KerasDistributedOptimizer  # noqa: E402
from hvd_largebatch.tf import callbacks  # noqa: E402
from hvd_largebatch.tf.conadv import ConAdv as KerasConAdv  # noqa: E402
from hvd_largebatch.torch_impl import LARS, DistributedOptimizer, broadcast_state  # noqa: E402
from hvd_largebatch.torch_impl.conadv import ConAdv  # noqa: E402
from hvd_largebatch.torch_impl.dual_bn import convert_to_dual_bn  # noqa: E402
from launcher import write_results  # noqa: E402

hvd_torch.init()
hvd_tf.init()
rank, size = hvd_torch.rank(), hvd_torch.size()
torch.set_num_threads(1)

DIM, HIDDEN, CLASSES, PER_RANK, STEPS = 8, 16, 4, 6, 6
ATTACK = dict(epsilon=0.2, step_size=0.15, attack_iters=2, random_start_prob=0.0, targeted=False, input_range=(-1.0, 1.0))
LARS_ARGS = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01)

rng = np.random.default_rng(1234)  # the same global data on every rank
global_x = rng.uniform(-1, 1, size=(STEPS, size * PER_RANK, DIM))
global_y = rng.integers(0, CLASSES, size=(STEPS, size * PER_RANK))
mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)


def flat(tensors):
    return np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in tensors]).tolist()


# ------------------------------------------------------------------------------------ PyTorch
def torch_mlp():
    torch.manual_seed(rank)  # different on purpose: broadcast_state must make them equal
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)).double()


def torch_train(model, optimizer, batches, conadv):
    for (x, y), ahead in conadv.lookahead(batches):
        optimizer.zero_grad()
        conadv.loss(x, y, ahead).backward()
        optimizer.step()
    conadv.close()
    return flat(p.detach() for p in model.parameters())


model = torch_mlp()
opt = DistributedOptimizer(LARS(model.named_parameters(), lr=0.5, **LARS_ARGS), named_parameters=model.named_parameters())
broadcast_state(model, opt, root_rank=0)
initial = {k: v.clone() for k, v in model.state_dict().items()}
torch_initial = flat(initial.values())
local_batches = [(torch.from_numpy(global_x[t, mine]), torch.from_numpy(global_y[t, mine])) for t in range(STEPS)]
torch_weights = torch_train(model, opt, local_batches, ConAdv(model, staleness=1, seed=rank, **ATTACK))

single = torch_mlp()
single.load_state_dict(initial)
single_opt = LARS(single.named_parameters(), lr=0.5, **LARS_ARGS)
global_batches = [(torch.from_numpy(global_x[t]), torch.from_numpy(global_y[t])) for t in range(STEPS)]
torch_single = torch_train(single, single_opt, global_batches, ConAdv(single, staleness=1, seed=0, **ATTACK))

torch.manual_seed(rank)
cnn = convert_to_dual_bn(
    torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, DIM)), torch.nn.Conv1d(1, 4, 3, padding=1), torch.nn.BatchNorm1d(4),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * DIM, CLASSES),
    ).double()
)
cnn_opt = DistributedOptimizer(LARS(cnn.named_parameters(), lr=0.5, **LARS_ARGS), named_parameters=cnn.named_parameters())
broadcast_state(cnn, cnn_opt, root_rank=0)
cnn_weights = torch_train(cnn, cnn_opt, local_batches, ConAdv(cnn, epsilon=0.2, step_size=0.2, seed=100 + rank))
cnn_main_mean = cnn[2].running_mean.tolist()  # local statistics: Horovod averages gradients, not buffers

# -------------------------------------------------------------------------------------- Keras
keras.backend.set_floatx("float64")


def keras_mlp(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((DIM,)), keras.layers.Dense(HIDDEN, activation="tanh", name="hidden"), keras.layers.Dense(CLASSES, name="logits")]
    )


def keras_fit(base, optimizer, x, y, batch_size, callback_list, seed):
    model = KerasConAdv(base, staleness=1, seed=seed, **ATTACK)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=callback_list)
    return model


base = keras_mlp(seed=rank)  # different on purpose: the broadcast callback must make them equal
keras_model = keras_fit(
    base, KerasDistributedOptimizer(KerasLARS(learning_rate=0.5, **LARS_ARGS)),
    global_x[:, mine].reshape(-1, DIM), global_y[:, mine].reshape(-1), PER_RANK,
    [callbacks.BroadcastGlobalVariablesCallback(0)], seed=rank,
)
keras_weights = flat(v.numpy() for v in keras_model.base_model.trainable_variables)
keras_snapshot = flat(v.numpy() for v in keras_model._snapshots[0])

reference_base = keras_mlp(seed=0)  # rank 0's initial weights, which the broadcast gave everyone
keras_single_model = keras_fit(
    reference_base, KerasLARS(learning_rate=0.5, **LARS_ARGS),
    global_x.reshape(-1, DIM), global_y.reshape(-1), size * PER_RANK, [], seed=0,
)
keras_single = flat(v.numpy() for v in keras_single_model.base_model.trainable_variables)

write_results(
    rank,
    {
        "rank": rank,
        "size": size,
        "torch": torch_weights,
        "torch_initial": torch_initial,
        "torch_single": torch_single,
        "torch_cnn": cnn_weights,
        "torch_cnn_main_mean": cnn_main_mean,
        "keras": keras_weights,
        "keras_snapshot": keras_snapshot,
        "keras_single": keras_single,
    },
)
