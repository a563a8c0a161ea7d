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
    DistributedOptimizer,
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


# ---------------------------------------------------------------- what a new user trips on: exact errors
_TWICE = "; pass each tensor once, in one param group (a repeated tensor would be updated once per occurrence in every step)"
_CONSUMED = (
    "named_parameters is empty, but the optimizer has parameters: a generator such as model.named_parameters() can be "
    "read only once, and this one was already consumed (e.g. by the optimizer's constructor); pass "
    "list(model.named_parameters()), or leave named_parameters out to use the names the optimizer was built with"
)


def _consumed_generator():
    model = torch.nn.Linear(3, 2)
    named = model.named_parameters()
    return LARS(named), named  # the optimizer read the generator: nothing is left in it


# (id, call, exception type, the exact message)
EXACT = [
    ("duplicate-named-in-one-group", lambda: (lambda n: LARS(n * 2, lr=1.0))(_named()), ValueError,
     "params: the same tensor is passed twice, as 'weight' at param_groups[0][0] and as 'weight' at param_groups[0][2]" + _TWICE),
    ("duplicate-unnamed-across-groups", lambda: (lambda p: SGD([{"params": p}, {"params": p[1:]}]))(_plain()), ValueError,
     "params: the same tensor is passed twice, as param_groups[0][1] and as param_groups[1][0]" + _TWICE),
    ("duplicate-named-across-groups-clars", lambda: (lambda n: CLARS([{"params": n}, {"params": n[:1]}]))(_named()), ValueError,
     "params: the same tensor is passed twice, as 'weight' at param_groups[0][0] and as 'weight' at param_groups[1][0]" + _TWICE),
    ("duplicate-in-add_param_group-lamb", lambda: (lambda p: LAMB(p[:1]).add_param_group({"params": p}))(_plain()), ValueError,
     "params: the same tensor is passed twice, as param_groups[0][0] and as param_groups[1][0]" + _TWICE),
    ("distributed-optimizer-not-an-optimizer", lambda: DistributedOptimizer(torch.nn.Linear(2, 2)), TypeError,
     "optimizer must be a torch.optim.Optimizer instance, got torch.nn.modules.linear.Linear"),
    ("distributed-optimizer-consumed-named_parameters",
     lambda: (lambda pair: DistributedOptimizer(pair[0], named_parameters=pair[1]))(_consumed_generator()), ValueError, _CONSUMED),
    ("scheduler-first-group-lr-0",
     lambda: GradualWarmupScheduler(LARS([{"params": _plain()[:1], "lr": 0.0}, {"params": _plain()[1:], "lr": 0.1}]),
                                    schedules.Schedule(peak=0.1, total_steps=10)), ValueError,
     "param_groups[0]['lr'] is 0 but other groups' are not ([0.0, 0.1]): GradualWarmupScheduler scales each group by "
     "its lr over the first group's; give the first group a non-zero lr"),
]


@pytest.mark.parametrize("call,kind,message", [row[1:] for row in EXACT], ids=[row[0] for row in EXACT])
def test_new_user_mistakes_raise_the_exact_error(call, kind, message):
    with pytest.raises(kind) as error:
        call()
    assert type(error.value) is kind
    assert str(error.value) == message


def test_duplicate_check_leaves_the_optimizer_unchanged_and_keeps_legitimate_groups():
    params = _plain()
    opt = LARS([{"params": params[:1]}])
    with pytest.raises(ValueError, match="passed twice"):
        opt.add_param_group({"params": params})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[1:], "lr": 0.5})  # a new tensor is fine
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]


@pytest.fixture
def horovod_one_rank():
    import horovod.torch as hvd

    hvd.init()
    assert hvd.size() == 1
    return hvd


def test_distributed_optimizer_refuses_to_wrap_twice_and_keeps_horovods_own_wrapper_out(horovod_one_rank):
    hvd = horovod_one_rank
    model = torch.nn.Linear(3, 2)
    ours = DistributedOptimizer(LARS(model.named_parameters()))
    theirs = hvd.DistributedOptimizer(SGD(model.parameters()), named_parameters=model.named_parameters())
    for wrapped in (ours, theirs):
        with pytest.raises(ValueError) as error:
            DistributedOptimizer(wrapped)
        assert str(error.value) == "optimizer is already a DistributedOptimizer (or wraps one): wrap it only once"
    # a generator that has not been read yet is fine, and so is a list
    DistributedOptimizer(LARS(list(model.named_parameters())), named_parameters=model.named_parameters())


def test_broadcast_state_and_bn_averaging_without_horovod_initialised_raise_the_shared_error(monkeypatch):
    import horovod.torch as hvd

    from hvd_largebatch.errors import HorovodNotInitialisedError
    from hvd_largebatch.torch_impl import average_batchnorm_statistics, broadcast_state

    monkeypatch.setattr(hvd, "is_initialized", lambda: False)  # as in a process that never called hvd.init()
    message = "Horovod is not initialised: call horovod.torch.init() before using the distributed pieces"
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    for call in (lambda: broadcast_state(model, LARS(model.parameters())), lambda: average_batchnorm_statistics(model)):
        with pytest.raises(HorovodNotInitialisedError) as error:
            call()
        assert str(error.value) == message


# ---------------------------------------------------------------- what a new user trips on: exact warnings
def _nan_step(opt, params):
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    if isinstance(opt, CLARS):
        opt.set_grad_norms({p: 1.0 for p in params})
    opt.step()


@pytest.mark.parametrize("make", [LARS, SGD, CLARS, LAMB], ids=["lars", "sgd", "clars", "lamb"])
def test_skipped_steps_warn_at_the_first_and_every_hundredth(make, recwarn):
    params = _plain()
    opt = make(params)
    for _ in range(250):
        _nan_step(opt, params)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    name = make.__name__
    assert messages == [
        f"{name}: skipped an update because a gradient holds NaN or Inf (weights and optimizer state untouched); "
        f"{count} update(s) skipped so far (optimizer.skipped_steps). Warned at the first skip and every 100th; "
        "pass nonfinite='raise' to stop instead"
        for count in (1, 100, 200)
    ]
    assert opt.skipped_steps == 250


def test_scheduler_keeps_per_group_lrs_as_scales_of_the_schedule():
    params = _plain()
    opt = LARS([{"params": params[:1], "lr": 0.5}, {"params": params[1:], "lr": 0.1}])
    schedule = schedules.make_schedule(0.1, 6, peak=0.4, warmup_steps=3, decay="linear")
    sched = GradualWarmupScheduler(opt, schedule)
    assert sched.group_scales == [1.0, 0.2]
    for t in range(5):
        assert [g["lr"] for g in opt.param_groups] == [schedule(t), schedule(t) * 0.2]
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["group_scales"] == [1.0, 0.2]
    other = GradualWarmupScheduler(LARS(_plain(), lr=1.0), schedules.Schedule(peak=1.0, total_steps=2))
    other.load_state_dict(state)
    assert other.group_scales == [1.0, 0.2] and other.schedule == schedule


def test_scheduler_warns_once_when_something_else_changed_the_lr_and_takes_it_back():
    params = _plain()
    opt = SGD(params, lr=0.1)
    schedule = schedules.make_schedule(0.1, 10, peak=0.5, warmup_steps=4)
    sched = GradualWarmupScheduler(opt, schedule)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()  # t = 1: lr 0.2
    plateau.step(1.0)
    plateau.step(2.0)  # no improvement: halves the LR
    assert opt.param_groups[0]["lr"] == 0.1
    with pytest.warns(UserWarning) as caught:
        opt.step()
        sched.step()
    assert [str(w.message) for w in caught] == [
        "GradualWarmupScheduler: param group 0's lr was changed from 0.2 (set by the scheduler) to 0.1 by something "
        "else (another LR scheduler such as ReduceLROnPlateau, or code writing param_groups[i]['lr']); the scheduler "
        "owns the LR and sets schedule(t) * group_scales[i] again now. Express the change in the Schedule (its decay) instead"
    ]
    assert opt.param_groups[0]["lr"] == schedule(2)
    opt.param_groups[0]["lr"] = 0.01
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second change does not warn again
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == schedule(3)


def test_scheduler_warns_once_when_stepped_past_the_schedule():
    # 10000 examples at a global batch of 512: steps_per_epoch says 19, a DataLoader with drop_last=False gives 20
    spe = schedules.steps_per_epoch(10000, 512)
    schedule = schedules.lars_poly(0.1, 256, 512, spe, epochs=2, warmup_epochs=1)
    opt = LARS(_plain(), lr=0.1)
    sched = GradualWarmupScheduler(opt, schedule)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2 * 20):
            opt.step()
            sched.step()
    assert [str(w.message) for w in caught] == [
        "GradualWarmupScheduler: optimizer update 38 ran past the schedule's total_steps=38; the LR stays at "
        "schedule(total_steps)=0 from now on. Build the schedule with the number of updates the loop really makes: "
        "steps_per_epoch=len(loader) (a DataLoader with drop_last=False has one more batch per epoch than "
        "schedules.steps_per_epoch(dataset_size, global_batch) when the batch does not divide the data), or use "
        "drop_last=True"
    ]
    assert opt.param_groups[0]["lr"] == 0.0
