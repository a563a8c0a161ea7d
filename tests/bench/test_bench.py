"""Tests of the bench app's plumbing: data sharding, recipes, results store, command line, launcher.

Everything is tested in-process except one launch: ``horovodrun -np 2
... hvd-largebatch bench`` must run a one-run study inside that launch. The
study itself (tuning, targets, fit, reports, the end-to-end study) is tested
in ``test_study.py``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvd_largebatch.bench import data, launch, recipes, report, study
from hvd_largebatch.bench.data import MNIST1DSpec, ShardedBatches, epoch_permutation, load_mnist1d, shard_of
from hvd_largebatch.bench.results import FailureMarkers, ResultsStore

TINY = MNIST1DSpec(train_size=1024, test_size=256)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private data cache shared by this module's tests (generation happens once)."""
    return tmp_path_factory.mktemp("hvd_lb_cache")


@pytest.fixture
def cache_env(cache_dir, monkeypatch):
    monkeypatch.setenv("HVD_LB_CACHE", str(cache_dir))
    return cache_dir


# --------------------------------------------------------------------------------------------
# Sharding and the shared per-epoch permutation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size,global_batch", [(1, 8), (2, 8), (4, 12), (3, 9)])
def test_ranks_partition_each_global_batch_in_rank_order(world_size, global_batch):
    shards = [ShardedBatches(50, global_batch, r, world_size, seed=7) for r in range(world_size)]
    assert {s.steps_per_epoch for s in shards} == {50 // global_batch}
    for epoch in range(3):
        for step in range(shards[0].steps_per_epoch):
            parts = [s.indices(epoch, step) for s in shards]
            assert all(len(p) == global_batch // world_size for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts), shards[0].global_batch_indices(epoch, step))
        # epoch_indices is the same thing for the whole epoch; no example repeats within an epoch.
        for s in shards:
            for step, row in enumerate(s.epoch_indices(epoch)):
                np.testing.assert_array_equal(row, s.indices(epoch, step))
        whole = np.concatenate([s.epoch_indices(epoch).ravel() for s in shards])
        assert len(np.unique(whole)) == len(whole) == shards[0].steps_per_epoch * global_batch


def test_epoch_permutation_is_shared_and_changes_every_epoch():
    first = epoch_permutation(1000, 0, seed=3)
    assert sorted(first.tolist()) == list(range(1000))
    np.testing.assert_array_equal(first, epoch_permutation(1000, 0, seed=3))  # same on every rank / call
    assert not np.array_equal(first, epoch_permutation(1000, 1, seed=3))
    assert not np.array_equal(first, epoch_permutation(1000, 0, seed=4))
    # Two ranks' objects see the same order, whatever else they computed before.
    a, b = ShardedBatches(1000, 100, 0, 2, seed=3), ShardedBatches(1000, 100, 1, 2, seed=3)
    a.epoch_order(5)
    np.testing.assert_array_equal(a.epoch_order(2), b.epoch_order(2))


def test_batches_yields_the_rows_of_the_indices():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.arange(20)
    shards = ShardedBatches(20, 8, 1, 2, seed=0)
    got = list(shards.batches(x, y, epoch=1))
    assert len(got) == 2
    for (xb, yb), rows in zip(got, shards.epoch_indices(1)):
        np.testing.assert_array_equal(yb, rows)
        np.testing.assert_array_equal(xb, x[rows])


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(num_examples=100, global_batch=7, rank=0, world_size=2, seed=0), "global_batch"),
        (dict(num_examples=100, global_batch=128, rank=0, world_size=2, seed=0), "dataset_size"),
        (dict(num_examples=100, global_batch=8, rank=2, world_size=2, seed=0), "rank"),
        (dict(num_examples=100, global_batch=8, rank=0, world_size=0, seed=0), "world_size"),
        (dict(num_examples=100, global_batch=8, rank=0, world_size=2, seed=-1), "seed"),
    ],
)
def test_sharding_rejects_bad_input_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ShardedBatches(**kwargs)


def test_step_out_of_range_is_refused():
    shards = ShardedBatches(100, 10, 0, 2, seed=0)
    with pytest.raises(ValueError, match="step"):
        shards.indices(0, 10)


def test_shard_of_splits_the_test_set_into_disjoint_parts():
    array = np.arange(11)
    parts = [shard_of(array, r, 3) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), array)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_of(array, 3, 3)


# --------------------------------------------------------------------------------------------
# MNIST-1D generation and cache
# --------------------------------------------------------------------------------------------
def test_mnist1d_is_generated_once_cached_and_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    spec = MNIST1DSpec(train_size=195, test_size=52, seed=5)  # 247 samples: not a multiple of 10
    np.random.seed(123)
    random.seed(123)
    expected_numpy, expected_python = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    lines = []
    first = load_mnist1d(spec, cache_dir=tmp_path, log=lines.append)
    assert (np.random.rand(), random.random()) == (expected_numpy, expected_python)
    assert len(lines) == 1 and "generating MNIST-1D" in lines[0]
    assert first.x_train.shape == (195, data.SIGNAL_LENGTH) and first.x_test.shape == (52, data.SIGNAL_LENGTH)
    assert first.x_train.dtype == np.float32 and first.y_train.dtype == np.int64
    assert set(np.unique(first.y_train)) <= set(range(10)) and len(np.unique(first.y_train)) == 10
    assert first.generator_args["num_samples"] == 250 and "url" not in first.generator_args
    # Second load: from the file, without calling the generator.
    monkeypatch.setattr(data, "_generate", lambda *a: pytest.fail("regenerated a cached dataset"))
    second = load_mnist1d(spec, cache_dir=tmp_path, log=lines.append)
    assert len(lines) == 1
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    assert second.generator_args == first.generator_args


def test_a_damaged_cache_file_is_regenerated(tmp_path):
    spec = MNIST1DSpec(train_size=40, test_size=10)
    good = load_mnist1d(spec, cache_dir=tmp_path)
    good.path.write_bytes(b"not an npz file")
    again = load_mnist1d(spec, cache_dir=tmp_path)
    np.testing.assert_array_equal(good.x_train, again.x_train)


def test_cache_key_depends_on_every_setting(tmp_path):
    paths = {
        load_mnist1d(spec, cache_dir=tmp_path).path
        for spec in (
            MNIST1DSpec(train_size=40, test_size=10),
            MNIST1DSpec(train_size=40, test_size=10, seed=1),
            MNIST1DSpec(train_size=30, test_size=20),
            MNIST1DSpec(train_size=40, test_size=10, generator_overrides=(("iid_noise_scale", 0.05),)),
        )
    }
    assert len(paths) == 4


def test_cache_directory_follows_hvd_lb_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HVD_LB_CACHE", str(tmp_path))
    assert data.cache_directory() == tmp_path / "data"


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(train_size=0), "train_size"),
        (dict(test_size=1.5), "test_size"),
        (dict(seed=-3), "seed"),
        (dict(generator_overrides=(("url", "http://x"),)), "generator_overrides"),
        (dict(generator_overrides=(("num_samples", 9),)), "generator_overrides"),
    ],
)
def test_mnist1d_spec_rejects_bad_input(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        MNIST1DSpec(**kwargs)


def test_unknown_generator_argument_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown mnist1d argument"):
        load_mnist1d(MNIST1DSpec(train_size=10, test_size=10, generator_overrides=(("noise", 1),)), cache_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Recipes and plans
# --------------------------------------------------------------------------------------------
def cell_plan(method, batch, *, epochs=9, train_size=60000, framework="torch", world_size=2):
    return recipes.plan_cell(
        recipes.METHODS[method], framework=framework, global_batch=batch, world_size=world_size, epochs=epochs,
        train_size=train_size, seed=0,
    )


def test_every_method_scales_its_base_lr_by_its_rule():
    for method, recipe in recipes.METHODS.items():
        small, large = cell_plan(method, recipes.BASE_BATCH), cell_plan(method, 64 * recipes.BASE_BATCH)
        assert small.schedule.peak == pytest.approx(recipe.base_lr)
        factor = 8.0 if recipe.scaling == "sqrt" else 64.0
        assert large.schedule.peak == pytest.approx(recipe.base_lr * factor), method
        assert large.steps_per_epoch == 60000 // 8192 and large.per_worker_batch == 4096


def test_recipes_differ_as_documented():
    sgd, goyal, nesterov, adam, lars, clars, lamb, conadv = (cell_plan(m, 2048) for m in recipes.METHOD_NAMES)
    epochs, spe = 9, 60000 // 2048
    # sgd and goyal: same step decay at 1/3, 2/3, 8/9 of training; only goyal warms up (from the base LR).
    assert sgd.schedule.warmup == "none" and sgd.schedule.decay == "step"
    assert goyal.schedule.warmup == "gradual" and goyal.schedule.warmup_start == goyal.base_lr
    assert goyal.schedule.warmup_steps == round(recipes.WARMUP_FRACTION * epochs * spe)
    assert sgd.schedule.milestones == goyal.schedule.milestones == (87, 174, 232)  # steps: 1/3, 2/3, 8/9 of 261
    assert sgd.optimizer_config == {**goyal.optimizer_config, "lr": sgd.schedule(0)}
    # nesterov, adam, lars, lamb, conadv warm up then decay as poly(2); clars does not warm up.
    assert nesterov.optimizer == "sgd" and nesterov.optimizer_config["nesterov"] is True
    assert adam.optimizer == "lamb" and adam.exclusions == {"exclude_from_layer_adaptation": "."}
    assert lamb.exclusions == {} and adam.scaling == "sqrt" and nesterov.scaling == "linear"
    for cell in (nesterov, adam, lars, lamb, conadv):
        assert cell.schedule.warmup == "gradual" and cell.schedule.decay == "poly" and cell.schedule.power == 2
    assert clars.schedule.warmup == "none" and clars.schedule.decay == "poly"
    assert clars.optimizer == "clars" and clars.optimizer_config["estimator"] == "exact"
    assert clars.optimizer_config["trust_coefficient"] == 16 * lars.optimizer_config["trust_coefficient"]
    assert conadv.optimizer == "lars" and conadv.conadv["dual_bn"] is True and lars.conadv is None
    assert lamb.scaling == "sqrt" and lamb.optimizer_config["weight_decay"] == 0.01
    # Every hyperparameter of the optimizer record is written out, defaults included.
    assert set(lars.optimizer_config) == {
        "lr", "momentum", "weight_decay", "trust_coefficient", "eps", "nesterov", "clip", "momentum_correction",
        "nonfinite",
    }


def test_a_plan_round_trips_through_json():
    for method in recipes.METHOD_NAMES:
        cell = cell_plan(method, 512)
        assert recipes.CellPlan.from_config(json.loads(json.dumps(cell.to_config()))) == cell
        assert cell.key == f"torch:{method}:512"


def test_short_runs_keep_only_milestones_after_the_warmup():
    cell = cell_plan("goyal", 8192, epochs=1, train_size=60000)  # 7 steps, warmup 1 step
    assert cell.schedule.milestones and all(m > cell.schedule.warmup_steps for m in cell.schedule.milestones)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(framework="jax"), "framework"),
        (dict(global_batch=1001), "global_batch"),
        (dict(epochs=0), "epochs"),
        (dict(global_batch=128, train_size=100), "dataset_size"),
    ],
)
def test_plan_cell_rejects_bad_input(kwargs, argument):
    args = dict(framework="torch", global_batch=512, world_size=2, epochs=2, train_size=60000, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        recipes.plan_cell(recipes.METHODS["lars"], **args)


def test_recipe_for_and_base_lr_override():
    assert recipes.recipe_for("lars", 0.5).base_lr == 0.5
    with pytest.raises(ValueError, match="method"):
        recipes.recipe_for("rmsprop")
    with pytest.raises(ValueError, match="base_lr"):
        recipes.recipe_for("lars", -1.0)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def settings(**kwargs):
    return study.StudySettings(**{"epochs": 1, "workers": 2, "data": TINY, "validation_size": 256, **kwargs})


def test_inside_horovodrun_is_detected_from_the_environment():
    assert launch.inside_horovodrun({"HOROVOD_RANK": "1"})
    assert launch.inside_horovodrun({"OMPI_COMM_WORLD_RANK": "0"})
    assert not launch.inside_horovodrun({"PATH": "/bin"})


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "sgd,sgd"], "--methods must be a non-empty list without repeats"),
        (["--targets", "0.97,95"], "--targets must be an accuracy in (0, 1)"),
        (["--lr-range", "0.5"], "--lr-range must hold exactly 2 number(s)"),
        (["--batch-sizes", "64,big"], "--batch-sizes must be comma-separated integers"),
        (["--base-lr", "lars:2"], "--base-lr must look like METHOD=LR"),
        (["--trials", "0"], "--trials must be an integer >= 1"),
        (["--validation-size", "60000"], "--validation-size must be smaller"),
        (["--framework", "jax"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, tmp_path, capsys):
    from hvd_largebatch.cli import main

    status = main(["bench", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "results.json").exists()


ALLOWED_METHODS = "sgd, goyal, nesterov, adam, lars, clars, lamb, conadv"


@pytest.mark.parametrize(
    "methods, message",
    [
        ("sgd,rmsprop", f"--methods has an unknown name 'rmsprop'; allowed: {ALLOWED_METHODS} (comma-separated)"),
        ("lars,rmsprop,adamw", f"--methods has unknown names 'rmsprop', 'adamw'; allowed: {ALLOWED_METHODS} "
         "(comma-separated)"),
        ("LARS", f"--methods has an unknown name 'LARS'; allowed: {ALLOWED_METHODS} (comma-separated)"),
        (" , ", f"--methods must name at least one of {ALLOWED_METHODS} (comma-separated); got ' , '"),
        ("sgd,sgd", "--methods must be a non-empty list without repeats, got ['sgd', 'sgd']"),
    ],
)
def test_methods_errors_name_exactly_the_unknown_ones(methods, message, tmp_path, capsys):
    from hvd_largebatch.cli import main

    status = main(["bench", "--out", str(tmp_path / "out"), "--methods", methods])
    assert (status, capsys.readouterr().err) == (2, f"hvd-largebatch bench: error: {message}\n")
    assert not (tmp_path / "out").exists()


def test_known_methods_parse_in_the_order_given():
    from hvd_largebatch.bench.plan import parse_name_list

    assert parse_name_list("lars, adam,,clars", "--methods", recipes.METHOD_NAMES) == ["lars", "adam", "clars"]


# --------------------------------------------------------------------------------------------
# Results store, failure messages, the launcher
# --------------------------------------------------------------------------------------------
def test_store_refuses_other_settings_and_reruns_changed_recipes(tmp_path):
    store = ResultsStore(tmp_path)
    store.adopt_settings(settings().to_config())
    cell = cell_plan("lars", 512)
    store.add(cell, {"test_accuracy": 0.9, "test_loss": float("nan"), "train_loss": float("inf"), "seconds": 1.0})
    reloaded = ResultsStore(tmp_path)
    assert reloaded.records[0]["result"]["test_loss"] is None  # strict JSON: NaN/Inf stored as null
    with pytest.raises(ValueError, match=r"--out .* other settings \(epochs: 1 there, 3 here\)"):
        reloaded.adopt_settings(settings(epochs=3).to_config())
    reloaded.adopt_settings(settings().to_config())  # the same settings are fine
    changed = recipes.plan_cell(recipes.recipe_for("lars", 0.25), framework="torch", global_batch=512,
                                world_size=2, epochs=9, train_size=60000, seed=0)
    finished, pending, differs = reloaded.split([cell, changed, cell_plan("sgd", 512)])
    assert [p.key for p in finished] == ["torch:lars:512"]
    assert [p.key for p in pending] == ["torch:lars:512", "torch:sgd:512"]
    assert [p.key for p in differs] == ["torch:lars:512"]


def test_a_results_file_of_another_kind_is_refused(tmp_path):
    (tmp_path / "results.json").write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="not a results file"):
        ResultsStore(tmp_path)


def test_failure_message_prefers_the_original_error_over_horovod_shutdown(tmp_path):
    markers = FailureMarkers(tmp_path)
    cell = cell_plan("lars", 512)
    markers.mark_running(cell, 3, 8)
    message = launch.failure_message(9, markers, 2, tmp_path / "results.json", tmp_path / "sweep.log")
    assert "during cell torch lars batch 512" in message and "2 finished cell(s) are kept" in message

    class HorovodInternalError(RuntimeError):
        pass

    markers.mark_failed(0, cell, HorovodInternalError("Horovod has been shut down"), "")
    markers.mark_failed(1, cell, ValueError("the real cause"), "")
    message = launch.failure_message(1, markers, 2, tmp_path / "results.json", tmp_path / "sweep.log")
    assert message.startswith("hvd-largebatch bench: stopped: cell torch lars batch 512 failed on rank 1: "
                              "ValueError: the real cause")
    markers.clear()
    message = launch.failure_message(1, markers, 0, tmp_path / "r.json", tmp_path / "l", ["boom: no horovod"])
    assert "before any cell started" in message and "boom: no horovod" in message


def test_the_launcher_shows_rank_0_stdout_only_and_logs_everything(tmp_path):
    script = (
        "printf '[0]<stdout>:gloo rank 0\\n[1]<stdout>:gloo rank 1\\n[0]<stderr>:warning\\n"
        "[1,0]<stdout>:mpi rank 0\\n[1,1]<stdout>:mpi rank 1\\nhorovodrun itself\\n'; exit 3"
    )
    shown = []
    status, tail = launch._stream_horovodrun(["sh", "-c", script], dict(os.environ), tmp_path / "log", shown.append)
    assert status == 3
    assert shown == ["gloo rank 0", "mpi rank 0"]
    assert tail == ["[1]<stdout>:gloo rank 1", "[0]<stderr>:warning", "[1,1]<stdout>:mpi rank 1", "horovodrun itself"]
    assert "gloo rank 1" in (tmp_path / "log").read_text()


def test_only_a_refused_gloo_rendezvous_counts_as_a_lost_connection():
    assert launch.lost_gloo_connection(["[1]<stderr>: gloo::IoException: Connection refused [127.0.0.1]:4001"])
    assert not launch.lost_gloo_connection(["ValueError: Connection refused by the user"])
    assert not launch.lost_gloo_connection(["gloo::IoException: Timed out"])


# --------------------------------------------------------------------------------------------
# The models: same size in both frameworks
# --------------------------------------------------------------------------------------------
def test_torch_and_keras_models_have_the_same_parameter_count():
    import torch

    from hvd_largebatch.bench.keras_model import count_parameters as keras_count
    from hvd_largebatch.bench.keras_model import mnist1d_convnet
    from hvd_largebatch.bench.torch_model import MNIST1DConvNet
    from hvd_largebatch.bench.torch_model import count_parameters as torch_count

    for channels in [(32, 64, 64), (8, 16, 24)]:
        torch_model, keras_model = MNIST1DConvNet(channels), mnist1d_convnet(channels, seed=0)
        assert torch_count(torch_model) == keras_count(keras_model)
        torch_shapes = sorted(tuple(p.shape) for p in torch_model.parameters())
        keras_shapes = sorted(tuple(v.shape) for v in keras_model.trainable_weights)
        assert sorted(map(np.prod, torch_shapes)) == sorted(map(np.prod, keras_shapes))
    assert torch_count(MNIST1DConvNet()) == 25322
    logits = MNIST1DConvNet()(torch.zeros(3, data.SIGNAL_LENGTH))
    assert tuple(logits.shape) == (3, data.NUM_CLASSES)


@pytest.mark.parametrize(
    "module_name",
    [
        "hvd_largebatch.bench.atomic_file",
        "hvd_largebatch.bench.data",
        "hvd_largebatch.bench.model_spec",
        "hvd_largebatch.bench.plan",
        "hvd_largebatch.bench.recipes",
        "hvd_largebatch.bench.targets",
        "hvd_largebatch.bench.tuning",
        "hvd_largebatch.bench.scaling_fit",
        "hvd_largebatch.bench.noise_estimate",
        "hvd_largebatch.bench.report",
        "hvd_largebatch.bench.torch_model",
        "hvd_largebatch.bench.keras_model",
    ],
)
def test_docstring_examples_run(module_name):
    import doctest
    import importlib

    failures, tried = doctest.testmod(importlib.import_module(module_name))
    assert tried > 0 and failures == 0


# --------------------------------------------------------------------------------------------
# Real sweeps under horovodrun -np 2 (Gloo)
# --------------------------------------------------------------------------------------------
def run_bench(argv, cache_dir, timeout=600):
    env = {**os.environ, "HVD_LB_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "hvd_largebatch", "bench", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_started_by_horovodrun_the_study_runs_inside_that_launch(tmp_path, cache_dir):
    out = tmp_path / "inside"
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    command = [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "hvd_largebatch", "bench",
               "--framework", "torch", "--methods", "sgd", "--batch-sizes", "64", "--trials", "1", "--seeds", "0",
               "--epochs", "0", "--targets", "0.3", "--horizon", "10,0", "--train-size", str(TINY.train_size),
               "--validation-size", "256", "--test-size", str(TINY.test_size), "--out", str(out)]
    env = {**os.environ, "HVD_LB_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    for _ in range(2):  # Gloo's rendezvous can lose a port race on a busy machine
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or not launch.lost_gloo_connection(proc.stderr.splitlines()):
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[0]<stdout>:[1/1] torch sgd      batch    64 trial 0" in proc.stdout
    assert "[0]<stdout>:| sgd |" in proc.stdout and "[1]<stdout>" not in proc.stdout
    assert [r["key"] for r in ResultsStore(out).records] == ["torch:sgd:64:tune:0:0"]
    assert (out / report.TABLE_FILE).exists() and (out / report.PLOT_FILE).exists()
