"""Plans the batch-size sweep: the settings every cell shares and the list of cells (methods x batch sizes).

Also parses the comma-separated command-line lists of ``hvd-largebatch bench``.
Framework-free; :mod:`hvd_largebatch.bench.launch` runs what is planned here.

Example::

    >>> from hvd_largebatch.bench.plan import SweepSettings, plan_sweep
    >>> cells = plan_sweep("torch", ["sgd", "lars"], [512, 128], SweepSettings(epochs=1))
    >>> [cell.label for cell in cells]
    ['torch sgd batch 128', 'torch sgd batch 512', 'torch lars batch 128', 'torch lars batch 512']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from hvd_largebatch.bench.data import MNIST1DSpec
from hvd_largebatch.bench.recipes import BASE_BATCH, METHOD_NAMES, CellPlan, plan_cell, recipe_for
from hvd_largebatch.bench.worker import RUNNER_MODULES
from hvd_largebatch.config import check_choice, check_non_negative_int, check_positive, check_positive_int

__all__ = [
    "FRAMEWORKS",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_EPOCHS",
    "DEFAULT_WORKERS",
    "SweepSettings",
    "plan_sweep",
    "parse_base_lrs",
    "parse_int_list",
    "parse_name_list",
]

FRAMEWORKS = tuple(RUNNER_MODULES)
DEFAULT_BATCH_SIZES = (128, 512, 2048, 8192)
DEFAULT_EPOCHS = 5
DEFAULT_WORKERS = 2


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What every cell of a sweep shares; a resumed sweep must have the same settings.

    Attributes:
        epochs: passes over the training set per cell.
        workers: Horovod processes.
        seed: model-initialisation and data-order seed (the same for every cell).
        data: the MNIST-1D spec.
        base_batch: the batch the base LRs refer to.
        base_lrs: ``(method, lr)`` overrides of :data:`hvd_largebatch.bench.recipes.BASE_LRS`.
    """

    epochs: int
    workers: int = DEFAULT_WORKERS
    seed: int = 0
    data: MNIST1DSpec = dataclasses.field(default_factory=MNIST1DSpec)
    base_batch: int = BASE_BATCH
    base_lrs: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", check_positive_int("epochs", self.epochs))
        object.__setattr__(self, "workers", check_positive_int("workers", self.workers))
        object.__setattr__(self, "seed", check_non_negative_int("seed", self.seed))
        object.__setattr__(self, "base_batch", check_positive_int("base_batch", self.base_batch))
        overrides = dict(self.base_lrs)
        for method, lr in overrides.items():
            check_choice("base_lrs method", method, METHOD_NAMES)
            overrides[method] = check_positive(f"base LR of {method}", lr)
        object.__setattr__(self, "base_lrs", tuple(sorted(overrides.items())))

    def to_config(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "workers": self.workers,
            "seed": self.seed,
            "data": self.data.to_config(),
            "base_batch": self.base_batch,
            "base_lrs": dict(self.base_lrs),
        }


def plan_sweep(
    framework: str, methods: Sequence[str], batch_sizes: Sequence[int], settings: SweepSettings
) -> list[CellPlan]:
    """Every cell of the sweep, method by method, batch sizes ascending.

    Raises:
        ValueError: naming ``framework``, ``methods`` or ``batch_sizes`` (unknown,
            repeated or empty), or a batch the data or the workers cannot make.
    """
    check_choice("framework", framework, FRAMEWORKS)
    methods = list(methods)
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be a non-empty list without repeats, got {methods!r}")
    for method in methods:
        check_choice("methods", method, METHOD_NAMES)
    batches = [check_positive_int("batch_sizes", b) for b in batch_sizes]
    if not batches or len(set(batches)) != len(batches):
        raise ValueError(f"batch_sizes must be a non-empty list without repeats, got {list(batch_sizes)!r}")
    overrides = dict(settings.base_lrs)
    plans = []
    for method in methods:
        recipe = recipe_for(method, overrides.get(method))
        for batch in sorted(batches):
            if batch % settings.workers:
                raise ValueError(
                    f"batch_sizes must be multiples of workers={settings.workers} (each worker takes an equal "
                    f"share of the global batch); got {batch}"
                )
            if batch > settings.data.train_size:
                raise ValueError(
                    f"batch_sizes must be at most the training set size {settings.data.train_size}; got {batch}"
                )
            plans.append(
                plan_cell(
                    recipe, framework=framework, global_batch=batch, world_size=settings.workers,
                    epochs=settings.epochs, train_size=settings.data.train_size, seed=settings.seed,
                    base_batch=settings.base_batch,
                )
            )
    return plans


def parse_base_lrs(text: str | None) -> tuple[tuple[str, float], ...]:
    """``"lars=2,sgd=0.1"`` -> ``(("lars", 2.0), ("sgd", 0.1))``.

    Raises:
        ValueError: naming ``--base-lr`` and the expected form.
    """
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        method, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((method.strip(), float(value)))
        except ValueError:
            raise ValueError(f"--base-lr must look like METHOD=LR[,METHOD=LR...], got {text!r}") from None
    return tuple(pairs)


def parse_int_list(text: str, argument: str) -> list[int]:
    """``"128,512"`` -> ``[128, 512]``; raises ValueError naming ``argument``."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{argument} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{argument} must hold at least one integer, got {text!r}")
    return values


def parse_name_list(text: str, argument: str, allowed: Iterable[str]) -> list[str]:
    """``"sgd,lars"`` -> ``["sgd", "lars"]``; raises ValueError naming ``argument`` and the allowed names."""
    allowed = tuple(allowed)
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f"{argument} must be a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return names
