"""ONE table of bad inputs for every public function and record of the core.

Each row is ``(id, call, argument)``: ``call()`` must raise ``ValueError`` and
the message must name ``argument`` (so the user knows what to fix).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hvd_largebatch import config, noise_scale, reference, schedules
from hvd_largebatch.schedules import Schedule, make_schedule

NAN, INF = math.nan, math.inf
GOOD = dict(base_lr=0.1, base_batch=256, global_batch=8192, steps_per_epoch=156)
LARS_POLY = dict(GOOD, epochs=10)
GOYAL = dict(GOOD, epochs=90)


def small_schedule(**kw) -> Schedule:
    base = dict(peak=1.0, total_steps=12, warmup="gradual", warmup_steps=4, warmup_start=0.2)
    return Schedule(**{**base, **kw})


def lars_oracle(cfg_name: str = "lars") -> reference.ReferenceOptimizer:
    return reference.ReferenceOptimizer(config.optimizer_config(cfg_name), decay=[True], adapt=[True])


W, G = [np.ones((2, 2))], [np.ones((2, 2))]

BAD_INPUTS = [
    # ---- schedules: scaling and batch bookkeeping
    ("scale_lr negative lr", lambda: schedules.scale_lr(-0.1, 256, 8192), "base_lr"),
    ("scale_lr nan lr", lambda: schedules.scale_lr(NAN, 256, 8192), "base_lr"),
    ("scale_lr inf lr", lambda: schedules.scale_lr(INF, 256, 8192), "base_lr"),
    ("scale_lr zero base batch", lambda: schedules.scale_lr(0.1, 0, 8192), "base_batch"),
    ("scale_lr float global batch", lambda: schedules.scale_lr(0.1, 256, 8192.5), "global_batch"),
    ("scale_lr unknown rule", lambda: schedules.scale_lr(0.1, 256, 8192, "cubic"), "rule"),
    ("global_batch_size zero per-worker", lambda: schedules.global_batch_size(0, 2), "per_worker_batch"),
    ("global_batch_size zero world", lambda: schedules.global_batch_size(32, 0), "world_size"),
    ("global_batch_size bool world", lambda: schedules.global_batch_size(32, True), "world_size"),
    (
        "global_batch_size zero passes",
        lambda: schedules.global_batch_size(32, 2, backward_passes_per_step=0),
        "backward_passes_per_step",
    ),
    ("batch not divisible by world size", lambda: schedules.per_worker_batch_size(100, 3), "global_batch"),
    (
        "batch not divisible by world x passes",
        lambda: schedules.per_worker_batch_size(100, 2, backward_passes_per_step=3),
        "global_batch",
    ),
    ("per_worker_batch_size zero world", lambda: schedules.per_worker_batch_size(100, 0), "world_size"),
    ("steps_per_epoch empty dataset", lambda: schedules.steps_per_epoch(0, 256), "dataset_size"),
    ("steps_per_epoch dataset < batch", lambda: schedules.steps_per_epoch(100, 256), "dataset_size"),
    ("steps_per_epoch negative batch", lambda: schedules.steps_per_epoch(1000, -1), "global_batch"),
    ("steps_per_epoch non-bool flag", lambda: schedules.steps_per_epoch(1000, 256, "yes"), "drop_remainder"),
    ("epochs_to_steps negative", lambda: schedules.epochs_to_steps(-1, 10), "epochs"),
    ("epochs_to_steps zero spe", lambda: schedules.epochs_to_steps(1, 0), "steps_per_epoch"),
    ("momentum_correction negative prev", lambda: schedules.momentum_correction(-1.0, 0.1), "prev_lr"),
    ("momentum_correction inf prev", lambda: schedules.momentum_correction(INF, 0.1), "prev_lr"),
    ("momentum_correction nan new", lambda: schedules.momentum_correction(0.1, NAN), "new_lr"),
    # ---- make_schedule
    ("make_schedule negative lr", lambda: make_schedule(-0.1, 100), "base_lr"),
    ("make_schedule nan lr", lambda: make_schedule(NAN, 100), "base_lr"),
    ("make_schedule zero steps", lambda: make_schedule(0.1, 0), "total_steps"),
    ("make_schedule non-int steps", lambda: make_schedule(0.1, 100.5), "total_steps"),
    ("make_schedule warmup longer than training", lambda: make_schedule(0.1, 100, warmup_steps=101), "warmup_steps"),
    ("make_schedule non-int warmup", lambda: make_schedule(0.1, 100, warmup_steps=2.5), "warmup_steps"),
    ("make_schedule negative warmup", lambda: make_schedule(0.1, 100, warmup_steps=-1), "warmup_steps"),
    ("make_schedule unknown warmup", lambda: make_schedule(0.1, 100, warmup="slow"), "warmup"),
    ("make_schedule none warmup with steps", lambda: make_schedule(0.1, 100, warmup="none", warmup_steps=5), "warmup_steps"),
    ("make_schedule none warmup with start", lambda: make_schedule(0.1, 100, warmup="none", warmup_start=0.1), "warmup_start"),
    ("make_schedule negative start", lambda: make_schedule(0.1, 100, warmup_steps=5, warmup_start=-0.1), "warmup_start"),
    ("make_schedule nan start", lambda: make_schedule(0.1, 100, warmup_steps=5, warmup_start=NAN), "warmup_start"),
    ("make_schedule unknown start", lambda: make_schedule(0.1, 100, warmup_steps=5, warmup_start="zero"), "warmup_start"),
    (
        "make_schedule horovod start without world",
        lambda: make_schedule(0.1, 100, warmup_steps=5, warmup_start="peak/world_size"),
        "world_size",
    ),
    ("make_schedule zero world", lambda: make_schedule(0.1, 100, world_size=0), "world_size"),
    ("make_schedule unknown decay", lambda: make_schedule(0.1, 100, decay="exponential"), "decay"),
    ("make_schedule unknown scaling", lambda: make_schedule(0.1, 100, base_batch=256, global_batch=512, scaling="cubic"), "scaling"),
    ("make_schedule negative peak", lambda: make_schedule(0.1, 100, peak=-1.0), "peak"),
    ("make_schedule peak and batches", lambda: make_schedule(0.1, 100, peak=1.0, base_batch=256, global_batch=512), "peak"),
    ("make_schedule one batch only", lambda: make_schedule(0.1, 100, base_batch=256), "global_batch"),
    ("make_schedule zero base batch", lambda: make_schedule(0.1, 100, base_batch=0, global_batch=512), "base_batch"),
    ("make_schedule unsorted milestones", lambda: make_schedule(0.1, 100, decay="step", milestones=(60, 30), milestone_unit="step"), "milestones"),
    ("make_schedule milestone in warmup", lambda: make_schedule(0.1, 100, warmup_steps=10, decay="step", milestones=(10,), milestone_unit="step"), "milestones"),
    ("make_schedule milestone past end", lambda: make_schedule(0.1, 100, decay="step", milestones=(101,), milestone_unit="step"), "milestones"),
    ("make_schedule step decay without milestones", lambda: make_schedule(0.1, 100, decay="step"), "milestones"),
    ("make_schedule milestones with cosine", lambda: make_schedule(0.1, 100, decay="cosine", milestones=(50,), milestone_unit="step"), "milestones"),
    ("make_schedule milestones as string", lambda: make_schedule(0.1, 100, decay="step", milestones="30"), "milestones"),
    ("make_schedule non-int step milestone", lambda: make_schedule(0.1, 100, decay="step", milestones=(50.5,), milestone_unit="step"), "milestones"),
    ("make_schedule negative epoch milestone", lambda: make_schedule(0.1, 100, decay="step", milestones=(-1,), steps_per_epoch=10), "milestones"),
    ("make_schedule epoch milestones without spe", lambda: make_schedule(0.1, 100, decay="step", milestones=(5,)), "steps_per_epoch"),
    ("make_schedule unknown milestone unit", lambda: make_schedule(0.1, 100, milestone_unit="days"), "milestone_unit"),
    ("make_schedule zero spe", lambda: make_schedule(0.1, 100, steps_per_epoch=0), "steps_per_epoch"),
    ("make_schedule zero gamma", lambda: make_schedule(0.1, 100, gamma=0.0), "gamma"),
    ("make_schedule growing gamma", lambda: make_schedule(0.1, 100, gamma=1.5), "gamma"),
    ("make_schedule zero power", lambda: make_schedule(0.1, 100, decay="poly", power=0.0), "power"),
    ("make_schedule nan power", lambda: make_schedule(0.1, 100, decay="poly", power=NAN), "power"),
    ("make_schedule negative end lr", lambda: make_schedule(0.1, 100, decay="cosine", end_lr=-1e-3), "end_lr"),
    ("make_schedule end lr above peak", lambda: make_schedule(0.1, 100, decay="poly", end_lr=0.2), "end_lr"),
    # ---- Schedule itself: construction, call, from_config
    ("Schedule gradual warmup without start", lambda: Schedule(peak=1.0, total_steps=10, warmup="gradual", warmup_steps=2), "warmup_start"),
    ("Schedule nan peak", lambda: Schedule(peak=NAN, total_steps=10), "peak"),
    ("Schedule bool total", lambda: Schedule(peak=1.0, total_steps=True), "total_steps"),
    ("Schedule call negative step", lambda: small_schedule()(-1), "step"),
    ("Schedule call float step", lambda: small_schedule()(1.5), "step"),
    ("Schedule call string step", lambda: small_schedule()("3"), "step"),
    ("Schedule call bool step", lambda: small_schedule()(True), "step"),
    ("from_config unknown key", lambda: Schedule.from_config({"peak": 1.0, "total_steps": 10, "bogus": 1}), "bogus"),
    ("from_config missing key", lambda: Schedule.from_config({"peak": 1.0}), "total_steps"),
    ("from_config not a mapping", lambda: Schedule.from_config([("peak", 1.0)]), "config"),
    ("from_config bad value", lambda: Schedule.from_config({"peak": 1.0, "total_steps": 10, "decay": "exp"}), "decay"),
    # ---- goyal / lars_poly
    ("goyal negative lr", lambda: schedules.goyal(**{**GOYAL, "base_lr": -0.1}), "base_lr"),
    ("goyal zero global batch", lambda: schedules.goyal(**{**GOYAL, "global_batch": 0}), "global_batch"),
    ("goyal zero spe", lambda: schedules.goyal(**{**GOYAL, "steps_per_epoch": 0}), "steps_per_epoch"),
    ("goyal non-int spe", lambda: schedules.goyal(**{**GOYAL, "steps_per_epoch": 156.5}), "steps_per_epoch"),
    ("goyal zero epochs", lambda: schedules.goyal(**{**GOYAL, "epochs": 0}), "epochs"),
    ("goyal warmup longer than training", lambda: schedules.goyal(**{**GOYAL, "epochs": 4}, warmup_epochs=5, milestones=(3,)), "warmup_epochs"),
    ("goyal milestone past end", lambda: schedules.goyal(**GOYAL, milestones=(30, 60, 100)), "milestones"),
    ("goyal zero gamma", lambda: schedules.goyal(**GOYAL, gamma=0.0), "gamma"),
    ("goyal unknown start", lambda: schedules.goyal(**GOYAL, warmup_start="half"), "warmup_start"),
    ("goyal default milestones all in warmup", lambda: schedules.goyal(**{**GOYAL, "epochs": 9}, warmup_epochs=8.5), "milestones"),
    ("lars_poly negative power", lambda: schedules.lars_poly(**LARS_POLY, power=-2.0), "power"),
    ("lars_poly end lr above peak", lambda: schedules.lars_poly(**LARS_POLY, end_lr=100.0), "end_lr"),
    ("lars_poly warmup longer than training", lambda: schedules.lars_poly(**LARS_POLY, warmup_epochs=20), "warmup_epochs"),
    ("lars_poly nan lr", lambda: schedules.lars_poly(**{**LARS_POLY, "base_lr": NAN}), "base_lr"),
    ("lars_poly unknown scaling", lambda: schedules.lars_poly(**LARS_POLY, scaling="cubic"), "scaling"),
    # ---- config records through optimizer_config (and directly)
    ("sgd negative lr", lambda: config.optimizer_config("sgd", lr=-0.1), "lr"),
    ("sgd nan lr", lambda: config.optimizer_config("sgd", lr=NAN), "lr"),
    ("sgd momentum 1", lambda: config.optimizer_config("sgd", momentum=1.0), "momentum"),
    ("sgd negative momentum", lambda: config.optimizer_config("sgd", momentum=-0.1), "momentum"),
    ("sgd negative weight decay", lambda: config.optimizer_config("sgd", weight_decay=-1e-4), "weight_decay"),
    ("sgd non-bool nesterov", lambda: config.optimizer_config("sgd", nesterov="yes"), "nesterov"),
    ("sgd nesterov without momentum", lambda: config.optimizer_config("sgd", nesterov=True, momentum=0.0), "nesterov"),
    ("sgd non-bool correction", lambda: config.optimizer_config("sgd", momentum_correction=1), "momentum_correction"),
    ("sgd unknown nonfinite policy", lambda: config.optimizer_config("sgd", nonfinite="ignore"), "nonfinite"),
    ("SGDConfig direct negative lr", lambda: config.SGDConfig(lr=-1.0), "lr"),
    ("lars zero trust coefficient", lambda: config.optimizer_config("lars", trust_coefficient=0.0), "trust_coefficient"),
    ("lars negative trust coefficient", lambda: config.optimizer_config("lars", trust_coefficient=-0.001), "trust_coefficient"),
    ("lars nan trust coefficient", lambda: config.optimizer_config("lars", trust_coefficient=NAN), "trust_coefficient"),
    ("lars momentum above 1", lambda: config.optimizer_config("lars", momentum=1.5), "momentum"),
    ("lars negative eps", lambda: config.optimizer_config("lars", eps=-1e-9), "eps"),
    ("lars non-bool clip", lambda: config.optimizer_config("lars", clip="yes"), "clip"),
    ("LARSConfig direct inf lr", lambda: config.LARSConfig(lr=INF), "lr"),
    ("larc contradicting clip", lambda: config.optimizer_config("larc", clip=False), "clip"),
    ("larc negative lr", lambda: config.optimizer_config("larc", lr=-0.1), "lr"),
    ("clars unknown estimator", lambda: config.optimizer_config("clars", estimator="sampled"), "estimator"),
    ("clars zero microbatches", lambda: config.optimizer_config("clars", estimator="microbatch:0"), "estimator"),
    ("clars zero chunk size", lambda: config.optimizer_config("clars", chunk_size=0), "chunk_size"),
    ("clars zero trust coefficient", lambda: config.CLARSConfig(trust_coefficient=0.0), "trust_coefficient"),
    ("lamb beta1 1", lambda: config.optimizer_config("lamb", beta1=1.0), "beta1"),
    ("lamb negative beta2", lambda: config.optimizer_config("lamb", beta2=-0.1), "beta2"),
    ("lamb negative eps", lambda: config.optimizer_config("lamb", eps=-1e-6), "eps"),
    ("lamb negative lr", lambda: config.optimizer_config("lamb", lr=-1e-3), "lr"),
    ("lamb nan weight decay", lambda: config.optimizer_config("lamb", weight_decay=NAN), "weight_decay"),
    ("LAMBConfig direct nan lr", lambda: config.LAMBConfig(lr=NAN), "lr"),
    ("unknown optimizer name", lambda: config.optimizer_config("adamw"), "name"),
    ("unknown optimizer argument", lambda: config.optimizer_config("lars", learning_rate=0.1), "learning_rate"),
    ("conadv zero epsilon", lambda: config.ConAdvConfig(epsilon=0.0), "epsilon"),
    ("conadv nan step size", lambda: config.ConAdvConfig(step_size=NAN), "step_size"),
    ("conadv negative staleness", lambda: config.ConAdvConfig(staleness=-1), "staleness"),
    ("conadv float staleness", lambda: config.ConAdvConfig(staleness=1.5), "staleness"),
    ("conadv zero attack iters", lambda: config.ConAdvConfig(attack_iters=0), "attack_iters"),
    ("conadv probability above 1", lambda: config.ConAdvConfig(random_start_prob=1.5), "random_start_prob"),
    ("conadv non-bool targeted", lambda: config.ConAdvConfig(targeted="yes"), "targeted"),
    ("conadv negative adv weight", lambda: config.ConAdvConfig(adv_weight=-1.0), "adv_weight"),
    ("conadv non-bool dual bn", lambda: config.ConAdvConfig(dual_bn=1), "dual_bn"),
    ("conadv reversed input range", lambda: config.ConAdvConfig(input_range=(1.0, -1.0)), "input_range"),
    ("conadv malformed input range", lambda: config.ConAdvConfig(input_range=(0.0, 1.0, 2.0)), "input_range"),
    # ---- exclusion rules
    ("exclusion of wrong type", lambda: config.resolve_exclusion(123, "exclude_from_weight_decay"), "exclude_from_weight_decay"),
    ("exclusion invalid regex", lambda: config.resolve_exclusion(["("], "exclude_from_layer_adaptation"), "exclude_from_layer_adaptation"),
    ("exclusion non-string pattern", lambda: config.resolve_exclusion([1], "exclude_from_weight_decay"), "exclude_from_weight_decay"),
    ("exclusion of a dict", lambda: config.resolve_exclusion({"bias": True}, "exclude_from_layer_adaptation"), "exclude_from_layer_adaptation"),
    ("exclusion unknown kind", lambda: config.ExclusionRule("everything"), "kind"),
    # ---- the reference oracle
    ("oracle with a conadv record", lambda: reference.ReferenceOptimizer(config.ConAdvConfig(), [True], [True]), "cfg"),
    ("oracle with a name instead of a record", lambda: reference.ReferenceOptimizer("lars", [True], [True]), "cfg"),
    ("oracle decay/adapt lengths differ", lambda: reference.ReferenceOptimizer(config.SGDConfig(), [True], [True, False]), "decay"),
    (
        "oracle for_tensors bad decay spec",
        lambda: reference.ReferenceOptimizer.for_tensors(config.LARSConfig(), ["w"], [(2, 2)], exclude_from_weight_decay=3),
        "exclude_from_weight_decay",
    ),
    (
        "oracle for_tensors bad adapt regex",
        lambda: reference.ReferenceOptimizer.for_tensors(config.LARSConfig(), ["w"], [(2, 2)], exclude_from_layer_adaptation="["),
        "exclude_from_layer_adaptation",
    ),
    ("oracle step negative lr", lambda: lars_oracle().step(W, G, lr=-0.1), "lr"),
    ("oracle step nan lr", lambda: lars_oracle().step(W, G, lr=NAN), "lr"),
    ("oracle step wrong tensor count", lambda: lars_oracle().step(W * 2, G * 2, lr=0.1), "params"),
    ("oracle clars without norms", lambda: lars_oracle("clars").step(W, G, lr=0.1), "grad_norms"),
    ("oracle lars with norms", lambda: lars_oracle().step(W, G, lr=0.1, grad_norms=[1.0]), "grad_norms"),
    # ---- gradient noise scale
    ("noise interval zero", lambda: noise_scale.check_interval(0), "interval"),
    ("noise interval negative", lambda: noise_scale.check_interval(-3), "interval"),
    ("noise interval float", lambda: noise_scale.check_interval(1.5), "interval"),
    ("noise decay one", lambda: noise_scale.check_ema_decay(1.0), "ema_decay"),
    ("noise decay negative", lambda: noise_scale.check_ema_decay(-0.1), "ema_decay"),
    ("noise decay nan", lambda: noise_scale.check_ema_decay(NAN), "ema_decay"),
    ("noise estimator decay", lambda: noise_scale.NoiseScaleEstimator(8, 16, ema_decay=1.5), "ema_decay"),
    ("noise estimator big not above small", lambda: noise_scale.NoiseScaleEstimator(16, 16), "big_batch"),
    ("noise estimator zero small", lambda: noise_scale.NoiseScaleEstimator(0, 16), "small_batch"),
    ("noise one rank no micro-batches", lambda: noise_scale.batch_sizes(32, 1, 1), "backward_passes_per_step"),
    ("noise zero batch size", lambda: noise_scale.batch_sizes(0, 2), "batch_size"),
    ("noise zero world size", lambda: noise_scale.batch_sizes(8, 0), "world_size"),
    ("noise update shapes differ", lambda: noise_scale.NoiseScaleEstimator(8, 16).update([1.0, 2.0], [1.0], 0), "big_sq_norms"),
    ("noise advice zero batch", lambda: noise_scale.advice(100.0, 0), "global_batch"),
    ("noise oracle groups", lambda: noise_scale.exact_estimates_from_per_example_gradients(np.ones((6, 2)), 4), "small_batch"),
    # ---- records built from a framework's arguments, framework class tables
    ("conadv from arguments", lambda: config.ConAdvConfig.from_arguments({"epsilon": -1.0, "model": None}), "epsilon"),
    ("optimizer classes missing one", lambda: config.optimizer_classes(type("SGD", (), {})), "classes"),
]


@pytest.mark.parametrize("call, argument", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError) as info:
        call()
    assert argument in str(info.value), f"message does not name {argument!r}: {info.value}"


def test_table_ids_are_unique():
    ids = [row[0] for row in BAD_INPUTS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "call, allowed",
    [
        (lambda: schedules.scale_lr(0.1, 256, 512, "cubic"), schedules.SCALING_RULES),
        (lambda: make_schedule(0.1, 100, warmup="slow"), schedules.WARMUP_KINDS),
        (lambda: make_schedule(0.1, 100, decay="exponential"), schedules.DECAY_KINDS),
        (lambda: make_schedule(0.1, 100, warmup_steps=5, warmup_start="zero"), schedules.WARMUP_STARTS),
        (lambda: config.optimizer_config("adamw"), config.OPTIMIZER_NAMES),
        (lambda: config.optimizer_config("sgd", nonfinite="ignore"), config.NONFINITE_POLICIES),
    ],
)
def test_unknown_names_list_the_allowed_values(call, allowed):
    with pytest.raises(ValueError) as info:
        call()
    for value in allowed:
        assert repr(value) in str(info.value)


# ---- what a new user trips on: the exact message of each refused schedule
_WARM_DOWN = (
    "global_batch=128 is below base_batch=256, so the scaled peak LR 0.05 is below the warmup start 0.1 and the "
    "warmup would lower the LR (a warm-down); allowed: global_batch >= base_batch, or no warmup (warmup_steps=0; "
    "warmup_epochs=0 in goyal and lars_poly) to train at the scaled-down LR, or a warmup_start <= the peak"
)
EXACT = [
    (
        "goyal global batch not divisible by world size",
        lambda: schedules.goyal(0.1, 256, 1000, 10, epochs=10, milestones=(8,), world_size=3),
        "global_batch=1000 is not divisible by world_size=3 x backward_passes_per_step=1; allowed: a multiple of 3",
    ),
    (
        "lars_poly global batch not divisible by world size",
        lambda: schedules.lars_poly(0.1, 256, 1000, 10, epochs=10, world_size=3),
        "global_batch=1000 is not divisible by world_size=3 x backward_passes_per_step=1; allowed: a multiple of 3",
    ),
    (
        "make_schedule global batch not divisible by world size",
        lambda: make_schedule(0.1, 100, base_batch=256, global_batch=1000, world_size=3),
        "global_batch=1000 is not divisible by world_size=3 x backward_passes_per_step=1; allowed: a multiple of 3",
    ),
    ("goyal global batch below base batch", lambda: schedules.goyal(0.1, 256, 128, 10, epochs=10, milestones=(8,)), _WARM_DOWN),
    ("lars_poly global batch below base batch", lambda: schedules.lars_poly(0.1, 256, 128, 10, epochs=10), _WARM_DOWN),
    (
        "make_schedule warmup start above peak",
        lambda: make_schedule(0.1, 100, peak=0.05, warmup_steps=5),
        "warmup_start=0.1 is above peak=0.05: the warmup would lower the LR (a warm-down); allowed: "
        "0 <= warmup_start <= peak, or warmup_steps=0 (no warmup)",
    ),
    (
        "Schedule constant warmup start above peak",
        lambda: Schedule(peak=1.0, total_steps=10, warmup="constant", warmup_steps=2, warmup_start=2.0),
        "warmup_start=2.0 is above peak=1.0: the warmup would lower the LR (a warm-down); allowed: "
        "0 <= warmup_start <= peak, or warmup_steps=0 (no warmup)",
    ),
]


@pytest.mark.parametrize("call, message", [row[1:] for row in EXACT], ids=[row[0] for row in EXACT])
def test_refused_schedules_say_exactly_why(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_what_stays_allowed_below_the_base_batch_and_with_a_world_size():
    # a smaller batch without warmup trains at the linearly scaled-down LR
    s = schedules.goyal(0.1, 256, 128, 10, epochs=10, warmup_epochs=0, milestones=(8,))
    assert s(0) == 0.05 and s(80) == pytest.approx(0.005, rel=1e-12)
    # Horovod's start (peak / world_size) is below the peak, and 1024 divides over 4 workers
    h = schedules.goyal(0.1, 256, 1024, 10, epochs=10, milestones=(8,), warmup_start="peak/world_size", world_size=4)
    assert (h(0), h(50)) == (0.1, 0.4)
