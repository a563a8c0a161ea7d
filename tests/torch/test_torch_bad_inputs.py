"""A table of bad inputs: every argument of every public torch entry point raises ValueError naming it."""

from __future__ import annotations

import math

import pytest
import torch

from hvd_largebatch import schedules
from hvd_largebatch.torch_impl import (
    CLARS,
    LAMB,
    LARS,
    SGD,
    GradualWarmupScheduler,
    create_optimizer,
    per_example_grad_norm_sums,
    save_checkpoint,
    load_checkpoint,
)
from optimizer_cases import BAD_HYPERPARAMETERS
from torch_adapter import torch_kwargs, torch_message


def _named():
    torch.manual_seed(0)
    return list(torch.nn.Linear(3, 2).named_parameters())


def _plain():
    return [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(2))]


# (id, callable, text that must appear in the message)
BAD = [
    # params
    ("params-tensor", lambda: LARS(torch.nn.Parameter(torch.randn(2))), "params"),
    ("params-int", lambda: LARS(3), "params"),
    ("params-empty", lambda: LARS([]), "params"),
    ("params-mixed", lambda: LARS([_plain()[0], ("b", _plain()[1])]), "params"),
    ("params-junk", lambda: LARS([torch.randn(2), "x"]), "params"),
    ("params-group-without-params", lambda: LARS([{"lr": 0.1}]), "params"),
    ("params-group-empty", lambda: LARS([{"params": []}]), "params"),
    # momentum family: every argument
    ("lr-negative", lambda: LARS(_plain(), lr=-0.1), "lr"),
    ("lr-nan", lambda: SGD(_plain(), lr=math.nan), "lr"),
    ("lr-string", lambda: LARS(_plain(), lr="0.1"), "lr"),
    ("momentum-1", lambda: LARS(_plain(), momentum=1.0), "momentum"),
    ("momentum-negative", lambda: SGD(_plain(), momentum=-0.1), "momentum"),
    ("weight_decay-negative", lambda: LARS(_plain(), weight_decay=-1e-4), "weight_decay"),
    ("weight_decay-inf", lambda: SGD(_plain(), weight_decay=math.inf), "weight_decay"),
    ("trust_coefficient-0", lambda: LARS(_plain(), trust_coefficient=0.0), "trust_coefficient"),
    ("trust_coefficient-negative", lambda: CLARS(_plain(), trust_coefficient=-1.0), "trust_coefficient"),
    ("eps-negative", lambda: LARS(_plain(), eps=-1e-9), "eps"),
    ("nesterov-not-bool", lambda: LARS(_plain(), nesterov=1), "nesterov"),
    ("nesterov-without-momentum", lambda: SGD(_plain(), nesterov=True, momentum=0.0), "nesterov"),
    ("clip-not-bool", lambda: LARS(_plain(), clip="yes"), "clip"),
    ("momentum_correction-not-bool", lambda: SGD(_plain(), momentum_correction=None), "momentum_correction"),
    ("exclude_from_weight_decay-int", lambda: LARS(_named(), exclude_from_weight_decay=3), "exclude_from_weight_decay"),
    ("exclude_from_weight_decay-bad-regex", lambda: LARS(_named(), exclude_from_weight_decay=["("]), "exclude_from_weight_decay"),
    ("exclude_from_weight_decay-regex-unnamed", lambda: LARS(_plain(), exclude_from_weight_decay=["bias"]), "exclude_from_weight_decay"),
    ("exclude_from_layer_adaptation-int", lambda: LARS(_named(), exclude_from_layer_adaptation=1.5), "exclude_from_layer_adaptation"),
    ("exclude_from_layer_adaptation-regex-unnamed", lambda: LAMB(_plain(), exclude_from_layer_adaptation="w"), "exclude_from_layer_adaptation"),
    ("foreach-not-bool", lambda: LARS(_plain(), foreach="auto"), "foreach"),
    ("nonfinite-unknown", lambda: LARS(_plain(), nonfinite="ignore"), "nonfinite"),
    ("estimator-unknown", lambda: CLARS(_plain(), estimator="approx"), "estimator"),
    ("estimator-microbatch-0", lambda: CLARS(_plain(), estimator="microbatch:0"), "estimator"),
    ("chunk_size-0", lambda: CLARS(_plain(), chunk_size=0), "chunk_size"),
    ("chunk_size-float", lambda: CLARS(_plain(), chunk_size=2.5), "chunk_size"),
    # LAMB
    ("lamb-lr-negative", lambda: LAMB(_plain(), lr=-1e-3), "lr"),
    ("lamb-betas-not-pair", lambda: LAMB(_plain(), betas=0.9), "betas"),
    ("lamb-betas-triple", lambda: LAMB(_plain(), betas=(0.9, 0.99, 0.9)), "betas"),
    ("lamb-beta1-1", lambda: LAMB(_plain(), betas=(1.0, 0.999)), "betas[0]"),
    ("lamb-beta2-negative", lambda: LAMB(_plain(), betas=(0.9, -0.1)), "betas[1]"),
    ("lamb-eps-negative", lambda: LAMB(_plain(), eps=-1.0), "eps"),
    ("lamb-weight_decay-negative", lambda: LAMB(_plain(), weight_decay=-0.01), "weight_decay"),
    ("lamb-nonfinite", lambda: LAMB(_plain(), nonfinite=True), "nonfinite"),
    ("lamb-foreach", lambda: LAMB(_plain(), foreach=0), "foreach"),
    # group dicts are validated like the constructor, including masks handed in
    ("group-lr", lambda: LARS([{"params": _plain(), "lr": -1.0}]), "lr"),
    ("group-momentum", lambda: SGD([{"params": _plain(), "momentum": 2.0}]), "momentum"),
    ("group-nonfinite-mixed", lambda: LARS([{"params": _plain()[:1]}, {"params": _plain()[1:], "nonfinite": "raise"}]), "nonfinite"),
    ("group-decay_mask-length", lambda: LARS([{"params": _plain(), "decay_mask": [True]}]), "decay_mask"),
    ("group-adapt_mask-type", lambda: LARS([{"params": _plain(), "adapt_mask": [1, 0]}]), "adapt_mask"),
    ("group-estimator-mixed", lambda: CLARS([{"params": _plain()[:1]}, {"params": _plain()[1:], "estimator": "microbatch:2"}]), "estimator"),
    # create_optimizer
    ("create-name", lambda: create_optimizer("adam", _plain()), "name"),
    ("create-name-type", lambda: create_optimizer(3, _plain()), "name"),
    ("create-unknown-argument", lambda: create_optimizer("lars", _plain(), betas=(0.9, 0.99)), "betas"),
    ("create-larc-clip-false", lambda: create_optimizer("larc", _plain(), clip=False), "clip"),
    ("create-sgd-trust", lambda: create_optimizer("sgd", _plain(), trust_coefficient=0.01), "trust_coefficient"),
    # scheduler
    ("scheduler-schedule", lambda: GradualWarmupScheduler(LARS(_plain()), lambda step: 0.1), "schedule"),
    ("scheduler-last_epoch", lambda: GradualWarmupScheduler(LARS(_plain()), schedules.Schedule(peak=0.1, total_steps=10), last_epoch=-5), "last_epoch"),
    # per-example norms
    ("norms-estimator", lambda: per_example_grad_norm_sums(torch.nn.Linear(3, 2), torch.nn.functional.mse_loss, torch.randn(4, 3), torch.randn(4, 2), list(torch.nn.Linear(3, 2).parameters()), estimator="exact:3"), "estimator"),
    ("norms-chunk_size", lambda: (lambda m: per_example_grad_norm_sums(m, torch.nn.functional.mse_loss, torch.randn(4, 3), torch.randn(4, 2), list(m.parameters()), chunk_size=-1))(torch.nn.Linear(3, 2)), "chunk_size"),
    ("norms-params-foreign", lambda: per_example_grad_norm_sums(torch.nn.Linear(3, 2), torch.nn.functional.mse_loss, torch.randn(4, 3), torch.randn(4, 2), [torch.nn.Parameter(torch.zeros(2))]), "params"),
    ("norms-targets-size", lambda: (lambda m: per_example_grad_norm_sums(m, torch.nn.functional.mse_loss, torch.randn(4, 3), torch.randn(3, 2), list(m.parameters())))(torch.nn.Linear(3, 2)), "targets"),
    ("norms-k-larger-than-batch", lambda: (lambda m: per_example_grad_norm_sums(m, torch.nn.functional.mse_loss, torch.randn(4, 3), torch.randn(4, 2), list(m.parameters()), estimator="microbatch:5"))(torch.nn.Linear(3, 2)), "microbatch:5"),
    # trust-ratio recording and CLARS norms
    ("record-not-bool", lambda: LARS(_plain()).record_trust_ratios("on"), "enabled"),
    ("record-sgd", lambda: SGD(_plain()).record_trust_ratios(True), "trust ratio"),
    ("clars-set-norms-type", lambda: CLARS(_named()).set_grad_norms([0.1, 0.2]), "norms"),
    ("clars-set-norms-unknown-name", lambda: CLARS(_named()).set_grad_norms({"nope": 0.1}), "nope"),
    # checkpoints
    ("checkpoint-step", lambda: save_checkpoint("/tmp/never.pt", torch.nn.Linear(2, 2), LARS(_plain()), step=-1), "step"),
    ("checkpoint-extra", lambda: save_checkpoint("/tmp/never.pt", torch.nn.Linear(2, 2), LARS(_plain()), extra=[1]), "extra"),
    ("checkpoint-missing", lambda: load_checkpoint("/nonexistent/ckpt.pt", torch.nn.Linear(2, 2), LARS(_plain())), "path"),
]


@pytest.mark.parametrize("build,text", [(b, t) for _, b, t in BAD], ids=[i for i, _, _ in BAD])
def test_bad_input_raises_value_error_naming_it(build, text):
    with pytest.raises(ValueError) as error:
        build()
    assert text in str(error.value), str(error.value)


def test_messages_match_the_core_records():
    """The torch classes validate through hvd_largebatch.config, so messages are the core's."""
    from hvd_largebatch import config

    for build, core in [
        (lambda: LARS(_plain(), momentum=1.5), lambda: config.LARSConfig(momentum=1.5)),
        (lambda: CLARS(_plain(), chunk_size=0), lambda: config.CLARSConfig(chunk_size=0)),
        (lambda: SGD(_plain(), lr=-2.0), lambda: config.SGDConfig(lr=-2.0)),
    ]:
        with pytest.raises(ValueError) as ours:
            build()
        with pytest.raises(ValueError) as theirs:
            core()
        assert str(ours.value) == str(theirs.value)


def test_step_refuses_a_corrupted_lr_and_sparse_gradients():
    params = _plain()
    opt = LARS(params)
    opt.param_groups[0]["lr"] = math.nan
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    embedding = torch.nn.Embedding(4, 2, sparse=True)
    opt = SGD(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_clars_step_without_norms_says_what_to_call():
    model = torch.nn.Linear(3, 2)
    opt = CLARS(model.named_parameters())
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="add_grad_norms"):
        opt.step()


@pytest.mark.parametrize("bad", BAD_HYPERPARAMETERS, ids=[b.id for b in BAD_HYPERPARAMETERS])
def test_shared_bad_hyperparameters_raise_the_core_error_in_torch_spelling(bad):
    """The shared table (core spelling): create_optimizer raises the core's exception type and message."""
    core = bad.core_error()
    with pytest.raises(type(core)) as ours:
        create_optimizer(bad.name, _named(), **torch_kwargs(bad.hyper, bad.name))
    assert type(ours.value) is type(core)
    assert str(ours.value) == torch_message(str(core))
def test_distributed_optimizer_without_horovod_initialised_raises_the_shared_error(monkeypatch):
    import horovod.torch as hvd

    from hvd_largebatch.errors import HorovodNotInitialisedError
    from hvd_largebatch.torch_impl import DistributedOptimizer

    monkeypatch.setattr(hvd, "is_initialized", lambda: False)  # as in a process that never called hvd.init()
    with pytest.raises(HorovodNotInitialisedError, match=r"Horovod is not initialised: call horovod.torch.init\(\)"):
        DistributedOptimizer(LARS(_plain()))


def test_create_optimizer_reads_the_core_registry():
    from hvd_largebatch import config
    from hvd_largebatch.torch_impl.optimizer_factory import OPTIMIZER_CLASSES

    assert set(OPTIMIZER_CLASSES) == {spec.record_type for spec in config.OPTIMIZERS.values()}
    with pytest.raises(ValueError) as ours:
        create_optimizer("larc", _plain(), clip=False)
    with pytest.raises(ValueError) as core:
        config.optimizer_config("larc", clip=False)
    assert str(ours.value) == str(core.value) == "clip=False contradicts optimizer 'larc', which sets clip=True"
