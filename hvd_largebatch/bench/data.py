"""MNIST-1D for the batch-size study: generation, on-disk cache, and rank sharding.

MNIST-1D (Greydanus 2020) is a procedurally generated 1-D analogue of MNIST:
ten 12-point digit templates padded, scaled, translated, sheared and noised
into length-40 signals. This module builds it with the ``mnist1d`` package's
own generator (``mnist1d.data.make_dataset``), never its download URL, at a
larger sample count than the package's default of 5,000 so that a global batch
of 8192 still has several steps per epoch (default: 60,000 train / 10,000
test). The arrays are cached as ``.npz`` under
``$HVD_LB_CACHE/data`` (default ``~/.cache/hvd_largebatch/data``), keyed by
every generator argument, and written atomically so that two ranks generating
at once cannot leave a torn file.

Data-parallel order (:class:`ShardedBatches`): every epoch ``e`` all ranks
draw the same permutation of the training set from ``(seed, e)``; global batch
``s`` is the slice ``perm[s*B:(s+1)*B]`` and rank ``r`` of ``k`` trains on its
``r``-th contiguous ``B/k`` part. The ranks' parts concatenated in rank order
are exactly the batch a single process would take, which is what Horovod's
gradient average over the global batch assumes. The last ``N mod B`` examples
of each permutation are dropped, so every rank runs the same number of steps.

Everything here is NumPy and the standard library; ``mnist1d`` (which pulls in
SciPy, matplotlib and requests) is imported only when a dataset is generated.

Example:
    >>> from hvd_largebatch.bench.data import ShardedBatches
    >>> shards = [ShardedBatches(10, global_batch=4, rank=r, world_size=2, seed=0) for r in (0, 1)]
    >>> shards[0].steps_per_epoch, shards[0].per_worker_batch
    (2, 2)
    >>> both = [int(i) for s in shards for i in s.indices(epoch=0, step=1)]
    >>> both == [int(i) for i in shards[0].global_batch_indices(epoch=0, step=1)]
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hvd_largebatch import schedules
from hvd_largebatch.bench.atomic_file import write_atomically
from hvd_largebatch.config import check_non_negative_int, check_positive_int

__all__ = [
    "DEFAULT_TRAIN_SIZE",
    "DEFAULT_TEST_SIZE",
    "DEFAULT_SEED",
    "SIGNAL_LENGTH",
    "NUM_CLASSES",
    "MNIST1D",
    "MNIST1DSpec",
    "cache_directory",
    "load_mnist1d",
    "epoch_permutation",
    "ShardedBatches",
    "shard_of",
]

DEFAULT_TRAIN_SIZE = 60_000
DEFAULT_TEST_SIZE = 10_000
DEFAULT_SEED = 42
#: Length of every MNIST-1D signal (the generator's ``final_seq_length``).
SIGNAL_LENGTH = 40
NUM_CLASSES = 10
#: Bumped whenever the cached file layout changes, so old caches are not reused.
_CACHE_FORMAT = 1
#: Generator arguments a user may not change here: the URL is never used, and
#: the split is done by this module (``train_split`` is fixed to 1.0).
_FIXED_GENERATOR_ARGS = ("url", "num_samples", "train_split", "seed", "final_seq_length")


@dataclasses.dataclass(frozen=True)
class MNIST1DSpec:
    """What to generate: sizes, seed and the mnist1d generator arguments.

    Attributes:
        train_size: training examples (>= 1).
        test_size: test examples (>= 1).
        seed: the generator's seed (``mnist1d`` seeds NumPy's global RNG with it;
            :func:`load_mnist1d` restores the caller's RNG state afterwards).
        generator_overrides: changes to ``mnist1d.data.get_dataset_args()``
            (e.g. ``{"iid_noise_scale": 0.05}``); keys in
            ``_FIXED_GENERATOR_ARGS`` are refused.
    """

    train_size: int = DEFAULT_TRAIN_SIZE
    test_size: int = DEFAULT_TEST_SIZE
    seed: int = DEFAULT_SEED
    generator_overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_size", check_positive_int("train_size", self.train_size))
        object.__setattr__(self, "test_size", check_positive_int("test_size", self.test_size))
        object.__setattr__(self, "seed", check_non_negative_int("seed", self.seed))
        overrides = dict(self.generator_overrides)
        fixed = sorted(set(overrides) & set(_FIXED_GENERATOR_ARGS))
        if fixed:
            raise ValueError(
                f"generator_overrides may not set {', '.join(fixed)} (fixed by hvd_largebatch.bench.data); "
                f"use train_size/test_size/seed"
            )
        object.__setattr__(self, "generator_overrides", tuple(sorted(overrides.items())))

    @property
    def total_size(self) -> int:
        return self.train_size + self.test_size

    def to_config(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_config` inverts it."""
        return {
            "train_size": self.train_size,
            "test_size": self.test_size,
            "seed": self.seed,
            "generator_overrides": {k: v for k, v in self.generator_overrides},
        }

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> MNIST1DSpec:
        values = dict(values)
        values["generator_overrides"] = tuple(sorted(dict(values.get("generator_overrides", {})).items()))
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class MNIST1D:
    """The generated arrays.

    Attributes:
        x_train: ``(train_size, 40)`` float32 signals, standardised over the
            whole generated set (the generator's own normalisation).
        y_train: ``(train_size,)`` int64 labels in 0..9.
        x_test, y_test: the held-out part, same layout.
        spec: what was generated.
        generator_args: every argument passed to ``make_dataset`` (for the record).
        path: the cache file the arrays came from.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    spec: MNIST1DSpec
    generator_args: dict[str, Any]
    path: Path


def cache_directory() -> Path:
    """``$HVD_LB_CACHE/data``, else ``$XDG_CACHE_HOME/hvd_largebatch/data``, else ``~/.cache/...``.

    ``HVD_LB_CACHE`` is the same variable ``scripts/setup.sh`` uses for its wheel cache.
    """
    root = os.environ.get("HVD_LB_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "hvd_largebatch")
    return Path(root) / "data"


def _mnist1d_version() -> str:
    """The installed mnist1d version, read from its metadata (no import of mnist1d)."""
    from importlib import metadata

    try:
        return metadata.version("mnist1d")
    except metadata.PackageNotFoundError:
        raise ValueError("the mnist1d package is not installed: run `make setup` (or pip install mnist1d)") from None


def _generator_args(spec: MNIST1DSpec) -> dict[str, Any]:
    """The arguments passed to mnist1d's ``make_dataset`` for ``spec``."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # never downloaded
    unknown = sorted(set(dict(spec.generator_overrides)) - set(args))
    if unknown:
        raise ValueError(
            f"generator_overrides has unknown mnist1d argument(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(set(args) - set(_FIXED_GENERATOR_ARGS)))}"
        )
    args.update(dict(spec.generator_overrides))
    # make_dataset draws num_samples // 10 examples per class: round up to a multiple of 10.
    args["num_samples"] = -(-spec.total_size // NUM_CLASSES) * NUM_CLASSES
    args["train_split"] = 1.0  # the split below is exact; the generator's float split is not
    args["seed"] = spec.seed
    return args


def _cache_path(directory: Path, spec: MNIST1DSpec, version: str) -> Path:
    """The cache file of ``spec``; the key is the spec and the mnist1d version (which fixes its defaults)."""
    key = json.dumps({"format": _CACHE_FORMAT, "mnist1d": version, "spec": spec.to_config()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return directory / f"mnist1d-{spec.train_size}-{spec.test_size}-seed{spec.seed}-{digest}.npz"


def _generate(spec: MNIST1DSpec, args: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """Runs mnist1d's generator without disturbing the caller's global RNG state."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        generated = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x = np.asarray(generated["x"], dtype=np.float32)
    y = np.asarray(generated["y"], dtype=np.int64)
    train, total = spec.train_size, spec.total_size
    return x[:train], y[:train], x[train:total], y[train:total]


def load_mnist1d(
    spec: MNIST1DSpec | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> MNIST1D:
    """Returns MNIST-1D for ``spec``, generating and caching it on first use.

    Args:
        spec: sizes, seed and generator overrides (default: 60,000 / 10,000, seed 42).
        cache_dir: where the ``.npz`` lives (default :func:`cache_directory`).
        log: called with one line when the data are generated (e.g. ``print``).

    Raises:
        ValueError: for an invalid spec or an unknown generator argument.

    Example:
        >>> data = load_mnist1d(MNIST1DSpec(train_size=200, test_size=50))  # doctest: +SKIP
        >>> data.x_train.shape, data.x_test.shape  # doctest: +SKIP
        ((200, 40), (50, 40))
    """
    spec = MNIST1DSpec() if spec is None else spec
    directory = Path(cache_dir) if cache_dir is not None else cache_directory()
    path = _cache_path(directory, spec, _mnist1d_version())
    names = ("x_train", "y_train", "x_test", "y_test")
    if path.exists():
        try:
            with np.load(path) as stored:
                arrays = {name: stored[name] for name in names}
                args = json.loads(str(stored["generator_args"]))
            return MNIST1D(spec=spec, generator_args=args, path=path, **arrays)
        except (OSError, ValueError, KeyError):  # a damaged file is regenerated, not trusted
            pass
    args = _generator_args(spec)
    if log is not None:
        log(f"generating MNIST-1D ({spec.train_size:,} train / {spec.test_size:,} test, seed {spec.seed}) -> {path}")
    arrays = dict(zip(names, _generate(spec, args)))
    stored = {**arrays, "generator_args": np.array(json.dumps(args, sort_keys=True))}
    write_atomically(path, lambda stream: np.savez(stream, **stored), binary=True)
    return MNIST1D(spec=spec, generator_args=args, path=path, **arrays)


def epoch_permutation(num_examples: int, epoch: int, seed: int) -> np.ndarray:
    """The order of the training set in ``epoch``; the same on every rank.

    Drawn by ``numpy.random.default_rng([seed, epoch])``, so it depends only on
    ``(num_examples, epoch, seed)``: no RNG state to broadcast or checkpoint.

    Raises:
        ValueError: naming the argument for a non-integer or negative value.
    """
    num_examples = check_positive_int("num_examples", num_examples)
    epoch = check_non_negative_int("epoch", epoch)
    seed = check_non_negative_int("seed", seed)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class ShardedBatches:
    """Which training examples rank ``rank`` of ``world_size`` uses at each step.

    See the module docstring for the scheme. The object holds no RNG state:
    ``indices(epoch, step)`` is a pure function, so a resumed run sees the
    same batches.

    Args:
        num_examples: size of the training set.
        global_batch: examples per optimizer update over all ranks; a multiple
            of ``world_size`` and at most ``num_examples``.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of Horovod processes (passed in, never queried).
        seed: seed of the per-epoch permutations.

    Raises:
        ValueError: naming the argument and the allowed values.
    """

    def __init__(self, num_examples: int, global_batch: int, rank: int, world_size: int, seed: int):
        self.num_examples = check_positive_int("num_examples", num_examples)
        self.world_size = check_positive_int("world_size", world_size)
        self.rank = check_non_negative_int("rank", rank)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")
        self.per_worker_batch = schedules.per_worker_batch_size(global_batch, self.world_size)
        self.global_batch = int(global_batch)
        self.steps_per_epoch = schedules.steps_per_epoch(self.num_examples, self.global_batch)
        epoch_permutation(1, 0, seed)  # validates seed
        self.seed = int(seed)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This epoch's permutation of the whole training set (identical on all ranks)."""
        return epoch_permutation(self.num_examples, epoch, self.seed)

    def global_batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """The ``global_batch`` example indices of update ``step`` in ``epoch`` (all ranks' union)."""
        step = self._check_step(step)
        start = step * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """This rank's ``per_worker_batch`` example indices of update ``step`` in ``epoch``."""
        part = self.global_batch_indices(epoch, step)
        start = self.rank * self.per_worker_batch
        return part[start : start + self.per_worker_batch]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """All of this rank's indices for ``epoch``, shape ``(steps_per_epoch, per_worker_batch)``."""
        used = self.epoch_order(epoch)[: self.steps_per_epoch * self.global_batch]
        by_step = used.reshape(self.steps_per_epoch, self.world_size, self.per_worker_batch)
        return by_step[:, self.rank, :]

    def batches(self, x: np.ndarray, y: np.ndarray, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields this rank's ``(x, y)`` batches of ``epoch`` in step order."""
        if len(x) != self.num_examples or len(y) != self.num_examples:
            raise ValueError(
                f"x and y must hold num_examples={self.num_examples} examples, got {len(x)} and {len(y)}"
            )
        for step_indices in self.epoch_indices(epoch):
            yield x[step_indices], y[step_indices]

    def _check_step(self, step: int) -> int:
        checked = check_non_negative_int("step", step)
        if checked >= self.steps_per_epoch:
            raise ValueError(f"step must be an integer in [0, {self.steps_per_epoch}), got {step!r}")
        return checked

    def __repr__(self) -> str:
        return (
            f"ShardedBatches(num_examples={self.num_examples}, global_batch={self.global_batch}, "
            f"rank={self.rank}, world_size={self.world_size}, seed={self.seed})"
        )


def shard_of(array: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous part of ``array`` for evaluation (parts differ by at most one row).

    Used to split the test set so each rank evaluates a disjoint part and the
    counts are summed with one allreduce.
    """
    world_size = check_positive_int("world_size", world_size)
    if check_non_negative_int("rank", rank) >= world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    bounds = np.linspace(0, len(array), world_size + 1).round().astype(int)
    return array[bounds[int(rank)] : bounds[int(rank) + 1]]

