"""The command-line side of a study: its default lists, their checks and the comma-separated parsers.

The study itself (settings, runs, scheduler) is :mod:`hvd_largebatch.bench.study`.
Framework-free.

Example::

    >>> from hvd_largebatch.bench.plan import parse_float_list, parse_int_list
    >>> parse_int_list("64,256", "--batch-sizes"), parse_float_list("0.95", "--targets")
    ([64, 256], [0.95])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hvd_largebatch.bench.recipes import METHOD_NAMES
from hvd_largebatch.bench.worker import RUNNER_MODULES
from hvd_largebatch.config import check_choice, check_positive_int

__all__ = [
    "FRAMEWORKS",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_WORKERS",
    "check_study_lists",
    "parse_float_list",
    "parse_base_lrs",
    "parse_int_list",
    "parse_name_list",
]

FRAMEWORKS = tuple(RUNNER_MODULES)
#: Two batch sizes on each side of the critical batch the first probe found (about 600 for 95%).
DEFAULT_BATCH_SIZES = (64, 256, 1024, 4096)
DEFAULT_WORKERS = 2


def check_study_lists(framework: str, methods: Sequence[str], batch_sizes: Sequence[int]) -> None:
    """Checks the framework and the method and batch lists of a study.

    Raises:
        ValueError: naming ``framework``, ``methods`` or ``batch_sizes`` (unknown, repeated or empty).
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


def parse_float_list(text: str, argument: str, count: int | None = None) -> list[float]:
    """``"0.97,0.98"`` -> ``[0.97, 0.98]``; raises ValueError naming ``argument`` (and ``count`` when given)."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{argument} must be comma-separated numbers, got {text!r}") from None
    if not values or (count is not None and len(values) != count):
        wanted = f"exactly {count}" if count is not None else "at least one"
        raise ValueError(f"{argument} must hold {wanted} number(s), got {text!r}")
    return values


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
    """``"sgd,lars"`` -> ``["sgd", "lars"]``.

    Raises:
        ValueError: naming ``argument``, exactly the unknown names (or that
            none was given) and the allowed names.

    Example:
        >>> parse_name_list("lars,rmsprop,lamb,adamw", "--methods", ("lars", "lamb"))
        Traceback (most recent call last):
        ...
        ValueError: --methods has unknown names 'rmsprop', 'adamw'; allowed: lars, lamb (comma-separated)
    """
    allowed = tuple(allowed)
    names = [item.strip() for item in text.split(",") if item.strip()]
    if not names:
        raise ValueError(f"{argument} must name at least one of {', '.join(allowed)} (comma-separated); got {text!r}")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        label = "an unknown name" if len(unknown) == 1 else "unknown names"
        raise ValueError(
            f"{argument} has {label} {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)} (comma-separated)"
        )
    return names
