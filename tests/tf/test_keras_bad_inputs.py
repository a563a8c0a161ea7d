"""One table of bad inputs for every public entry point of hvd_largebatch.tf, and the errors they raise.

Each row calls the API with one bad argument; the error must be a
``ValueError`` whose message names the argument (Keras spelling:
``learning_rate``, ``epsilon``, ``beta_1``) and says what is allowed.
"""

from __future__ import annotations

import keras
import pytest

from hvd_largebatch import schedules
from hvd_largebatch.tf import (
    CLARS,
    LAMB,
    LARS,
    SGD,
    CLARSModel,
    average_batchnorm_statistics,
    batchnorm_moving_statistics,
    DistributedOptimizer,
    ScheduleAdapter,
    callbacks,
    create_optimizer,
    per_example_grad_norm_sums,
)
from keras_adapter import keras_kwargs, keras_message
from optimizer_cases import BAD_HYPERPARAMETERS

SCHEDULE = schedules.make_schedule(0.1, 100, peak=0.4, warmup_steps=10)
NO_WARMUP = schedules.make_schedule(0.1, 100, warmup="none")
KERNEL = keras.Variable([[1.0, 2.0]], name="kernel")

BAD_INPUTS = [
    # optimizers: values out of range, in Keras spelling
    ("lars-negative-lr", lambda: LARS(learning_rate=-0.1), r"learning_rate must be >= 0"),
    ("lars-nan-lr", lambda: LARS(learning_rate=float("nan")), r"learning_rate must be finite"),
    ("lars-string-lr", lambda: LARS(learning_rate="fast"), r"learning_rate must be a number"),
    ("lars-momentum-1", lambda: LARS(momentum=1.0), r"momentum must be in \[0, 1\)"),
    ("lars-trust-0", lambda: LARS(trust_coefficient=0.0), r"trust_coefficient must be > 0"),
    ("lars-negative-epsilon", lambda: LARS(epsilon=-1e-8), r"epsilon must be >= 0"),
    ("lars-negative-decay", lambda: LARS(weight_decay=-5e-4), r"weight_decay must be >= 0"),
    ("lars-nesterov-no-momentum", lambda: LARS(nesterov=True, momentum=0.0), r"nesterov=True requires momentum > 0"),
    ("lars-clip-not-bool", lambda: LARS(clip="yes"), r"clip must be True or False"),
    ("lars-nonfinite", lambda: LARS(nonfinite="ignore"), r"nonfinite must be one of 'skip', 'raise'"),
    ("lars-fused-not-bool", lambda: LARS(fused=1), r"fused must be True, False or 'native', got 1"),
    ("lars-exclusion-int", lambda: LARS(exclude_from_weight_decay=3), r"exclude_from_weight_decay must be None"),
    ("lars-exclusion-regex", lambda: LARS(exclude_from_layer_adaptation=["bias", "("]), r"exclude_from_layer_adaptation has an invalid regex"),
    ("lars-unknown-keras-arg", lambda: LARS(decay_steps=3), r"not recognized"),
    # core (and PyTorch) spellings: the error names the Keras argument to use
    ("lars-lr", lambda: LARS(lr=0.1), r"^LARS got lr=0\.1: Keras optimizers take learning_rate=0\.1 instead$"),
    ("sgd-lr", lambda: SGD(lr=0.5, momentum=0.9), r"^SGD got lr=0\.5: Keras optimizers take learning_rate=0\.5 instead$"),
    ("clars-lr", lambda: CLARS(lr=0.2), r"^CLARS got lr=0\.2: Keras optimizers take learning_rate=0\.2 instead$"),
    ("lars-eps", lambda: LARS(eps=1e-9), r"^LARS got eps=1e-09: Keras optimizers take epsilon=1e-09 instead$"),
    (
        "lamb-beta1-beta2",
        lambda: LAMB(beta1=0.8, beta2=0.99),
        r"^LAMB got beta1=0\.8, beta2=0\.99: Keras optimizers take beta_1=0\.8, beta_2=0\.99 instead$",
    ),
    (
        "lamb-torch-betas",
        lambda: LAMB(learning_rate=0.01, betas=(0.9, 0.999)),
        r"^LAMB got betas=\(0\.9, 0\.999\): Keras optimizers take beta_1=0\.9, beta_2=0\.999 instead$",
    ),
    # the same variable twice in the list the optimizer is built on
    (
        "lars-duplicate-variable",
        lambda: LARS().build([KERNEL, keras.Variable([0.0], name="bias"), KERNEL]),
        r"^var_list: the same tensor is passed twice, as 'kernel' at var_list\[0\] and as var_list\[2\]; pass each "
        r"tensor once \(a repeated tensor would be updated once per occurrence in every step\)$",
    ),
    ("lamb-duplicate-variable", lambda: LAMB().build([KERNEL, KERNEL]), r"^var_list: the same tensor is passed twice, as 'kernel' at var_list\[0\] and as var_list\[1\]"),
    ("sgd-momentum-negative", lambda: SGD(momentum=-0.1), r"momentum must be in \[0, 1\)"),
    ("sgd-correction-not-bool", lambda: SGD(momentum_correction=None), r"momentum_correction must be True or False"),
    ("clars-estimator", lambda: CLARS(estimator="microbatch:0"), r"estimator must be 'exact' or 'microbatch:k'"),
    ("clars-estimator-name", lambda: CLARS(estimator="ghost"), r"estimator must be 'exact' or 'microbatch:k'"),
    ("clars-chunk-size", lambda: CLARS(chunk_size=0), r"chunk_size must be an integer >= 1"),
    ("lamb-beta_1", lambda: LAMB(beta_1=1.0), r"beta_1 must be in \[0, 1\)"),
    ("lamb-beta_2", lambda: LAMB(beta_2=-0.5), r"beta_2 must be in \[0, 1\)"),
    ("lamb-epsilon", lambda: LAMB(epsilon=float("inf")), r"epsilon must be finite"),
    # create_optimizer
    ("create-unknown-name", lambda: create_optimizer("adamw"), r"name must be one of 'sgd', 'lars', 'larc', 'clars', 'lamb'"),
    ("create-larc-without-clip", lambda: create_optimizer("larc", clip=False), r"clip=False contradicts optimizer 'larc'"),
    ("create-core-spelling", lambda: create_optimizer("lamb", beta1=0.9), r"^LAMB got beta1=0\.9: Keras optimizers take beta_1=0\.9 instead$"),
    # DistributedOptimizer
    ("dist-not-an-optimizer", lambda: DistributedOptimizer("sgd"), r"optimizer must be a keras.optimizers.Optimizer"),
    ("dist-op", lambda: DistributedOptimizer(LARS(), op="max"), r"op must be one of 'average', 'sum', 'adasum'"),
    ("dist-compression", lambda: DistributedOptimizer(LARS(), compression="int8"), r"compression must be one of 'none', 'fp16'"),
    ("dist-passes-0", lambda: DistributedOptimizer(LARS(), backward_passes_per_step=0), r"backward_passes_per_step must be an integer >= 1"),
    ("dist-passes-float", lambda: DistributedOptimizer(LARS(), backward_passes_per_step=2.5), r"backward_passes_per_step must be an integer >= 1"),
    ("dist-twice", lambda: DistributedOptimizer(DistributedOptimizer(LARS())), r"already a DistributedOptimizer"),
    # schedules and callbacks
    ("adapter-not-a-schedule", lambda: ScheduleAdapter(lambda step: 0.1), r"schedule must be an hvd_largebatch.schedules.Schedule"),
    ("adapter-dtype", lambda: ScheduleAdapter(SCHEDULE, dtype="int32"), r"dtype must be one of .float16., .bfloat16., .float32., .float64.; got .int32."),
    ("broadcast-root-rank", lambda: callbacks.BroadcastGlobalVariablesCallback(root_rank=-1), r"root_rank must be an integer >= 0"),
    ("lr-callback-schedule", lambda: callbacks.LearningRateScheduleCallback(0.1), r"schedule must be an hvd_largebatch.schedules.Schedule"),
    ("lr-callback-correction", lambda: callbacks.LearningRateScheduleCallback(SCHEDULE, momentum_correction="yes"), r"momentum_correction must be True or False"),
    ("lr-callback-verbose", lambda: callbacks.LearningRateScheduleCallback(SCHEDULE, verbose=5), r"verbose must be one of 0, 1, 2; got 5"),
    ("warmup-callback-type", lambda: callbacks.GradualWarmupCallback([0.1, 0.2]), r"schedule_or_args must be an hvd_largebatch.schedules.Schedule or a mapping"),
    ("warmup-callback-no-warmup", lambda: callbacks.GradualWarmupCallback(NO_WARMUP), r"schedule_or_args must describe a gradual warmup"),
    ("warmup-callback-bad-args", lambda: callbacks.GradualWarmupCallback({"base_lr": -1.0, "total_steps": 10}), r"base_lr must be >= 0"),
    ("lr-callback-multiplier", lambda: callbacks.LearningRateScheduleCallback(SCHEDULE, lr_multiplier=0.0), r"^lr_multiplier must be > 0, got 0\.0$"),
    ("warmup-callback-multiplier", lambda: callbacks.GradualWarmupCallback(SCHEDULE, lr_multiplier=float("inf")), r"^lr_multiplier must be finite, got inf$"),
    ("skipped-steps-warn-every", lambda: callbacks.SkippedStepsLogger(warn_every=0), r"warn_every must be an integer >= 1"),
    # BatchNorm statistics
    ("bn-statistics-not-a-model", lambda: batchnorm_moving_statistics("model"), r"^model must be a keras.Model \(or layer\), got str$"),
    ("bn-average-not-a-model", lambda: average_batchnorm_statistics([KERNEL]), r"^model must be a keras.Model \(or layer\), got list$"),
    # CLARS per-example norms
    ("clars-model-not-a-model", lambda: CLARSModel("model"), r"model must be a keras.Model"),
    (
        "norm-sums-estimator",
        lambda: per_example_grad_norm_sums(lambda x, y: 0.0, [], None, None, estimator="microbatch"),
        r"estimator must be 'exact' or 'microbatch:k'",
    ),
    (
        "norm-sums-chunk",
        lambda: per_example_grad_norm_sums(lambda x, y: 0.0, [], None, None, chunk_size=-2),
        r"chunk_size must be an integer >= 1",
    ),
]


@pytest.mark.parametrize("call, message", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_raises_a_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_clars_set_grad_norms_takes_a_mapping_covering_the_adapted_variables():
    optimizer = CLARS()
    with pytest.raises(ValueError, match=r"build the optimizer"):
        optimizer.set_grad_norms({"kernel": 1.0})
    optimizer.build([keras.Variable([[1.0, 2.0]], name="kernel"), keras.Variable([0.0], name="bias")])
    with pytest.raises(ValueError, match=r"norms must be a mapping from variable path"):
        optimizer.set_grad_norms([1.0, 2.0])  # a vector, as torch's CLARS refuses too
    with pytest.raises(ValueError, match=r"norms has a key 'nope' that names no variable"):
        optimizer.set_grad_norms({"kernel": 1.0, "nope": 2.0})
    with pytest.raises(ValueError, match=r"norms\['kernel'\] must be a scalar, got shape \(2,\)"):
        optimizer.set_grad_norms({"kernel": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"norms must cover every adapted variable; missing kernel"):
        optimizer.set_grad_norms({"bias": 1.0})
    optimizer.set_grad_norms({"kernel": 3.0})  # the bias is not adapted: its entry may be left out
    assert optimizer.grad_norm_means.numpy().tolist() == [3.0, 0.0]


def test_the_per_variable_keras_hook_is_refused_with_a_pointer_to_apply():
    optimizer = LARS()
    w = keras.Variable([[1.0]], name="kernel")
    optimizer.build([w])
    with pytest.raises(NotImplementedError, match=r"call apply\(\)"):
        optimizer.update_step(keras.ops.ones((1, 1)), w, 0.1)


def test_the_switches_are_reported_only_after_build():
    with pytest.raises(ValueError, match=r"decided in build"):
        LARS().tensor_switches

#: Rows where Keras's message must differ from the core's, and the message it gives: Keras's
#: ``learning_rate`` also takes a LearningRateSchedule or a callable, so a string is refused
#: with a message that lists those forms (the core's says "lr must be a real number").
KERAS_OWN_MESSAGES = {
    "lars-lr-string": (
        "learning_rate must be a number >= 0, a keras.optimizers.schedules.LearningRateSchedule or a callable "
        "returning the LR; got '0.1'"
    ),
}


@pytest.mark.parametrize("bad", BAD_HYPERPARAMETERS, ids=[b.id for b in BAD_HYPERPARAMETERS])
def test_shared_bad_hyperparameters_raise_the_core_error_in_keras_spelling(bad):
    """The shared table (core spelling): create_optimizer raises the core's exception type and message."""
    core = bad.core_error()
    with pytest.raises(type(core)) as ours:
        create_optimizer(bad.name, **keras_kwargs(bad.hyper))
    assert type(ours.value) is type(core)
    assert str(ours.value) == KERAS_OWN_MESSAGES.get(bad.id, keras_message(str(core)))


def test_create_optimizer_reads_the_core_registry():
    from hvd_largebatch import config
    from hvd_largebatch.tf.optimizer_factory import OPTIMIZER_CLASSES

    assert set(OPTIMIZER_CLASSES) == {spec.record_type for spec in config.OPTIMIZERS.values()}
    with pytest.raises(ValueError) as ours:
        create_optimizer("larc", clip=False)
    with pytest.raises(ValueError) as core:
        config.optimizer_config("larc", clip=False)
    assert str(ours.value) == str(core.value) == "clip=False contradicts optimizer 'larc', which sets clip=True"
