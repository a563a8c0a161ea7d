"""Validated hyperparameter records shared by the PyTorch and Keras implementations.

Every optimizer of the package (``sgd``, ``lars``, ``larc``, ``clars``,
``lamb``) and the ConAdv trainer take their defaults and their validation from
this module, so both frameworks reject the same bad input with the same
message. The records use the core spelling (``lr``, ``eps``, ``beta1``); each
framework maps its own spelling (Keras ``learning_rate``, ``epsilon``,
``beta_1``) onto these names before building a record.

The module also holds the two per-tensor exclusion switches of
ALGORITHMS.md (weight decay and layer adaptation) as :class:`ExclusionRule`.

Example:
    >>> from hvd_largebatch import config
    >>> cfg = config.optimizer_config("larc", lr=0.2, weight_decay=5e-4)
    >>> cfg.clip, cfg.trust_coefficient
    (True, 0.001)
    >>> rule = config.resolve_exclusion(None, "exclude_from_weight_decay")
    >>> rule("layer1.0.bn1.weight", (64,)), rule("layer1.0.conv1.weight", (64, 3, 3, 3))
    (True, False)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Union

__all__ = [
    "NONFINITE_POLICIES",
    "CLARS_ESTIMATORS",
    "DEFAULT_EXCLUSION_PATTERNS",
    "SGDConfig",
    "LARSConfig",
    "CLARSConfig",
    "LAMBConfig",
    "ConAdvConfig",
    "OptimizerSpec",
    "OPTIMIZERS",
    "OPTIMIZER_NAMES",
    "resolve_optimizer",
    "optimizer_classes",
    "optimizer_config",
    "ExclusionRule",
    "ExclusionSpec",
    "resolve_exclusion",
    "parse_estimator",
]

#: What an optimizer does when a gradient holds NaN or Inf. ``"skip"`` leaves
#: weights and state untouched (on every rank, since gradients are averaged
#: first) and counts the skip; ``"raise"`` raises ``FloatingPointError``.
NONFINITE_POLICIES = ("skip", "raise")

#: Estimators of the CLARS per-example gradient norm mean: ``"exact"`` or
#: ``"microbatch:k"`` with a positive integer ``k``.
CLARS_ESTIMATORS = ("exact", "microbatch:k")
#: How the ``exact`` estimator measures: ghost-norm rules where a layer has one (the rest by
#: vmap / vectorized_map), or the vmap / vectorized_map reference path for every tensor.
EXACT_NORM_METHODS = ("auto", "vmap")

#: Default exclusion rule: a tensor is excluded when ``ndim <= 1`` or its full
#: path matches one of these (case-insensitive). ``bn`` must start a name
#: component (``bn1``, ``.bn.``) so that words like ``subnet`` do not match.
DEFAULT_EXCLUSION_PATTERNS = (r"bias", r"(?<![a-z])bn", r"batchnorm", r"norm")
_DEFAULT_EXCLUSION_RE = re.compile("|".join(DEFAULT_EXCLUSION_PATTERNS), re.IGNORECASE)


# --------------------------------------------------------------------------
# Checks shared by every record. Each names the argument and the allowed range.
# --------------------------------------------------------------------------
def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_numpy_scalar(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _is_numpy_scalar(value: Any) -> bool:
    # NumPy scalars (np.float32(0.1)) are accepted without importing NumPy here.
    return type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0


def check_non_negative(name: str, value: Any) -> float:
    """Returns ``value`` as a float, or raises ValueError unless it is finite and >= 0."""
    value = _check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    """Returns ``value`` as a float, or raises ValueError unless it is finite and > 0."""
    value = _check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def check_unit_interval(name: str, value: Any, *, closed_right: bool = False) -> float:
    """Returns ``value`` as a float, or raises ValueError unless it is in [0, 1) (or [0, 1])."""
    value = _check_number(name, value)
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not ok:
        allowed = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Returns ``value`` as an int, or raises ValueError unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) and not (
        _is_numpy_scalar(value) and float(value).is_integer()
    ):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def is_integer(value: Any) -> bool:
    """True for Python and NumPy integers (never bool, never a float), without importing NumPy."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu"


def check_int_in_range(name: str, value: Any, low: int, high: int | None = None, *, meaning: str = "") -> int:
    """Returns ``value`` as an int, or raises ValueError unless it is an integer with ``low <= value < high``.

    Python and NumPy integers are accepted, bools and floats are not. ``high``
    None means no upper bound; ``meaning`` is added to the message in
    parentheses (e.g. what the count counts).
    """
    if not is_integer(value) or int(value) < low or (high is not None and int(value) >= high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high})"
        note = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be an integer {allowed}{note}, got {value!r}")
    return int(value)


def check_non_negative_int(name: str, value: Any, *, meaning: str = "") -> int:
    """Returns ``value`` as an int, or raises ValueError unless it is a Python or NumPy integer >= 0."""
    return check_int_in_range(name, value, 0, meaning=meaning)


def check_bool(name: str, value: Any) -> bool:
    """Returns ``value``, or raises ValueError unless it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Returns ``value``, or raises ValueError unless it is one of ``allowed`` (a bool never stands for 0 or 1)."""
    allowed = tuple(allowed)
    bool_for_number = isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)
    if bool_for_number or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def parse_estimator(estimator: Any) -> tuple[str, int | None]:
    """Parses a CLARS estimator spec into ``(kind, microbatches)``.

    Args:
        estimator: ``"exact"`` or ``"microbatch:k"`` (``k`` a positive integer).

    Returns:
        ``("exact", None)`` or ``("microbatch", k)``.

    Raises:
        ValueError: naming ``estimator`` and the allowed forms.
    """
    if estimator == "exact":
        return "exact", None
    if isinstance(estimator, str) and estimator.startswith("microbatch:"):
        count = estimator.split(":", 1)[1]
        if count.isdigit() and int(count) >= 1:
            return "microbatch", int(count)
    raise ValueError(
        f"estimator must be 'exact' or 'microbatch:k' with k a positive integer; got {estimator!r}"
    )


# --------------------------------------------------------------------------
# Optimizer records
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Record:
    """Base of the frozen, validated records; each subclass defines ``_validate``, run on construction."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._validate()

    def _set(self, field: str, value: Any) -> None:
        object.__setattr__(self, field, value)

    def to_dict(self) -> dict[str, Any]:
        """The record's fields as a JSON-able dict (``from_dict`` inverts it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        return cls(**values)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]):
        """The record of the fields found in ``arguments`` (other keys ignored, missing fields at their defaults).

        The frameworks' constructors repeat a record's fields in their own
        signatures (so that help and IDEs show them) and pass ``locals()`` here,
        so each field is named once in each signature and once in the record.

        Example:
            >>> ConAdvConfig.from_arguments({"epsilon": 0.5, "model": None}).epsilon
            0.5
        """
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls) if f.name in arguments})

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class _MomentumRecord(_Record):
    """The fields and checks SGD and LARS share: the momentum family, LR inside the velocity."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    momentum_correction: bool = True
    nonfinite: str = "skip"

    def _validate(self) -> None:
        self._set("lr", check_non_negative("lr", self.lr))
        self._set("momentum", check_unit_interval("momentum", self.momentum))
        self._set("weight_decay", check_non_negative("weight_decay", self.weight_decay))
        check_bool("nesterov", self.nesterov)
        check_bool("momentum_correction", self.momentum_correction)
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True requires momentum > 0, got momentum=0.0")


@dataclasses.dataclass(frozen=True)
class SGDConfig(_MomentumRecord):
    """Momentum SGD with the LR inside the velocity (ALGORITHMS.md, SGD): the momentum-family fields only."""

    name: ClassVar[str] = "sgd"
    class_name: ClassVar[str] = "SGD"  # the class of both frameworks


@dataclasses.dataclass(frozen=True)
class LARSConfig(_MomentumRecord):
    """LARS (You, Gitman, Ginsburg 2017); ``clip=True`` is LARC. The momentum-family fields and these."""

    name: ClassVar[str] = "lars"
    class_name: ClassVar[str] = "LARS"  # the class of both frameworks
    trust_coefficient: float = 0.001
    eps: float = 0.0
    clip: bool = False

    def _validate(self) -> None:
        super()._validate()
        self._set("trust_coefficient", check_positive("trust_coefficient", self.trust_coefficient))
        self._set("eps", check_non_negative("eps", self.eps))
        check_bool("clip", self.clip)


@dataclasses.dataclass(frozen=True)
class CLARSConfig(LARSConfig):
    """CLARS (Huo, Gu, Huang 2021): LARS with the mean per-example gradient norm.

    ``chunk_size`` bounds how many per-example gradients the ``exact``
    estimator holds at once.
    """

    name: ClassVar[str] = "clars"
    class_name: ClassVar[str] = "CLARS"  # the class of both frameworks
    estimator: str = "exact"
    chunk_size: int = 32

    def _validate(self) -> None:
        super()._validate()
        parse_estimator(self.estimator)
        self._set("chunk_size", check_positive_int("chunk_size", self.chunk_size))

    @property
    def microbatches(self) -> int | None:
        """``k`` of ``"microbatch:k"``, or None for ``"exact"``."""
        return parse_estimator(self.estimator)[1]


@dataclasses.dataclass(frozen=True)
class LAMBConfig(_Record):
    """LAMB (You et al. 2019)."""

    name: ClassVar[str] = "lamb"
    class_name: ClassVar[str] = "LAMB"  # the class of both frameworks
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.01
    nonfinite: str = "skip"

    def _validate(self) -> None:
        self._set("lr", check_non_negative("lr", self.lr))
        self._set("beta1", check_unit_interval("beta1", self.beta1))
        self._set("beta2", check_unit_interval("beta2", self.beta2))
        self._set("eps", check_non_negative("eps", self.eps))
        self._set("weight_decay", check_non_negative("weight_decay", self.weight_decay))
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)


_CONADV_DEFAULT_EPSILON = 9 * 2 / 255  # official code's 9/255 on [0, 1] inputs, scaled to [-1, 1]


@dataclasses.dataclass(frozen=True)
class ConAdvConfig(_Record):
    """ConAdv (Liu, You et al., ICLR 2022): adversarial examples from stale weights.

    Attributes:
        epsilon: L-infinity radius of the perturbation.
        step_size: signed-gradient step ``alpha`` per attack iteration.
        staleness: ``tau``; the perturbation of batch t uses the weights of step t - tau.
            0 is ordinary sequential adversarial training.
        attack_iters: signed-gradient steps per perturbation.
        random_start_prob: probability of a uniform random start in [-epsilon, epsilon].
        targeted: descend toward a random wrong label (official code) instead of
            ascending the loss of the true label.
        adv_weight: weight of the adversarial loss (clean loss has weight 1).
        average_losses: divide the weighted sum by ``1 + adv_weight`` (a weighted
            mean), so that tensors a layer-wise optimizer does not adapt (biases,
            BatchNorm) are not stepped twice as far as in clean training.
        dual_bn: route adversarial examples through auxiliary BatchNorm statistics.
        input_range: ``(low, high)`` the adversarial inputs are clipped to, or None.
    """

    name: ClassVar[str] = "conadv"
    epsilon: float = _CONADV_DEFAULT_EPSILON
    step_size: float = _CONADV_DEFAULT_EPSILON
    staleness: int = 1
    attack_iters: int = 1
    random_start_prob: float = 0.8
    targeted: bool = True
    adv_weight: float = 1.0
    dual_bn: bool = True
    input_range: tuple[float, float] | None = (-1.0, 1.0)
    average_losses: bool = False

    def _validate(self) -> None:
        self._set("epsilon", check_positive("epsilon", self.epsilon))
        self._set("step_size", check_positive("step_size", self.step_size))
        self._set("staleness", check_non_negative_int("staleness", self.staleness))
        self._set("attack_iters", check_positive_int("attack_iters", self.attack_iters))
        self._set(
            "random_start_prob",
            check_unit_interval("random_start_prob", self.random_start_prob, closed_right=True),
        )
        check_bool("targeted", self.targeted)
        self._set("adv_weight", check_non_negative("adv_weight", self.adv_weight))
        check_bool("dual_bn", self.dual_bn)
        check_bool("average_losses", self.average_losses)
        if self.input_range is not None:
            try:
                low, high = self.input_range
            except (TypeError, ValueError):
                raise ValueError(
                    f"input_range must be None or a pair (low, high) with low < high, got {self.input_range!r}"
                ) from None
            low, high = _check_number("input_range[0]", low), _check_number("input_range[1]", high)
            if not low < high:
                raise ValueError(f"input_range must have low < high, got {self.input_range!r}")
            self._set("input_range", (low, high))


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer name means: a record type and the settings the name fixes.

    Variants are settings, not classes: ``larc`` is the LARS record with
    ``clip=True``. The fixed fields are spelled alike in the core, PyTorch
    and Keras, so each framework's ``create_optimizer`` applies them as they are.

    Attributes:
        record_type: the validated record of the optimizer's hyperparameters.
        fixed: fields the name sets; passing a different value is an error.
    """

    record_type: type[_Record]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)


#: The optimizer registry that ``optimizer_config`` and both frameworks' ``create_optimizer`` read.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(SGDConfig),
    "lars": OptimizerSpec(LARSConfig),
    "larc": OptimizerSpec(LARSConfig, {"clip": True}),
    "clars": OptimizerSpec(CLARSConfig),
    "lamb": OptimizerSpec(LAMBConfig),
}

#: Names accepted by ``optimizer_config`` and both frameworks' ``create_optimizer``.
OPTIMIZER_NAMES = tuple(OPTIMIZERS)

OptimizerConfig = Union[SGDConfig, LARSConfig, CLARSConfig, LAMBConfig]


def resolve_optimizer(name: str, kwargs: Mapping[str, Any]) -> tuple[str, OptimizerSpec, dict[str, Any]]:
    """Looks ``name`` up in :data:`OPTIMIZERS` and applies the settings it fixes to ``kwargs``.

    Args:
        name: one of ``OPTIMIZER_NAMES`` (case-insensitive).
        kwargs: the caller's arguments, in any framework's spelling.

    Returns:
        ``(key, spec, kwargs_with_fixed_settings)`` with ``key`` the lower-case name.

    Raises:
        ValueError: unknown ``name``, or an argument that contradicts a
            setting the name fixes (``clip=False`` for ``"larc"``).

    Example:
        >>> key, spec, kwargs = resolve_optimizer("LARC", {"lr": 0.2})
        >>> key, spec.record_type.__name__, kwargs
        ('larc', 'LARSConfig', {'lr': 0.2, 'clip': True})
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"name must be one of {', '.join(map(repr, OPTIMIZER_NAMES))}; got {name!r}")
    spec = OPTIMIZERS[key]
    for field, value in spec.fixed.items():
        if field in kwargs and kwargs[field] != value:
            raise ValueError(f"{field}={kwargs[field]!r} contradicts optimizer {key!r}, which sets {field}={value!r}")
    return key, spec, {**kwargs, **spec.fixed}


def optimizer_classes(*classes: type) -> dict[type, type]:
    """A framework's table of record type -> the class that implements it, for its ``create_optimizer``.

    Each record names its class (``LARSConfig.class_name == "LARS"``), the same
    in PyTorch and Keras, so a framework passes its optimizer classes and gets
    the table of every record type in :data:`OPTIMIZERS`.

    Raises:
        ValueError: naming a record type whose class is not among ``classes``.

    Example:
        >>> class SGD: pass
        >>> class LARS: pass
        >>> class CLARS: pass
        >>> class LAMB: pass
        >>> optimizer_classes(SGD, LARS, CLARS, LAMB)[LARSConfig] is LARS
        True
    """
    by_name = {cls.__name__: cls for cls in classes}
    table: dict[type, type] = {}
    for spec in OPTIMIZERS.values():
        record_type = spec.record_type
        if record_type.class_name not in by_name:
            raise ValueError(
                f"classes must include one named {record_type.class_name!r} for {record_type.__name__}; "
                f"got {', '.join(sorted(by_name)) or 'none'}"
            )
        table[record_type] = by_name[record_type.class_name]
    return table


def optimizer_config(name: str, **kwargs: Any) -> OptimizerConfig:
    """Builds the validated record for optimizer ``name``.

    Args:
        name: one of ``OPTIMIZER_NAMES`` (case-insensitive). ``"larc"`` is LARS
            with ``clip=True``.
        **kwargs: fields of the record, in core spelling.

    Raises:
        ValueError: unknown ``name``, unknown argument, or a value out of range.
    """
    key, spec, values = resolve_optimizer(name, kwargs)
    known = {f.name for f in dataclasses.fields(spec.record_type)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} for optimizer {key!r}; allowed: {', '.join(sorted(known))}"
        )
    return spec.record_type(**values)


# --------------------------------------------------------------------------
# Exclusion rules (weight decay / layer adaptation)
# --------------------------------------------------------------------------
Predicate = Callable[[str, tuple], bool]
ExclusionSpec = Union[None, bool, str, Iterable[str], Predicate, "ExclusionRule"]


class ExclusionRule:
    """Decides, from a tensor's full path and shape, whether it is excluded.

    Build one with :func:`resolve_exclusion`. Calling it returns True when the
    tensor is *excluded* (no weight decay, or no trust ratio).

    Kinds:
        ``default``: ``ndim <= 1`` or the path matches ``DEFAULT_EXCLUSION_PATTERNS``.
        ``none``: nothing is excluded.
        ``regex``: the path matches one of the user's regexes (``re.search``, case-sensitive).
        ``predicate``: a user callable ``(name, shape) -> bool``.
    """

    def __init__(self, kind: str, patterns: tuple[str, ...] = (), predicate: Predicate | None = None):
        self.kind = check_choice("kind", kind, ("default", "none", "regex", "predicate"))
        self.patterns = tuple(patterns)
        self.predicate = predicate
        self._compiled = [re.compile(p) for p in self.patterns]

    def __call__(self, name: str, shape: Iterable[int]) -> bool:
        shape = tuple(int(d) for d in shape)
        if self.kind == "default":
            return len(shape) <= 1 or bool(_DEFAULT_EXCLUSION_RE.search(name))
        if self.kind == "none":
            return False
        if self.kind == "regex":
            return any(p.search(name) for p in self._compiled)
        return bool(self.predicate(name, shape))

    @property
    def serialisable(self) -> bool:
        """False for a user predicate, which ``to_config`` cannot write down."""
        return self.kind != "predicate"

    def to_config(self) -> None | bool | list[str]:
        """A JSON-able spec that ``resolve_exclusion`` turns back into this rule.

        Raises:
            ValueError: for a predicate rule.
        """
        if self.kind == "default":
            return None
        if self.kind == "none":
            return False
        if self.kind == "regex":
            return list(self.patterns)
        raise ValueError("an exclusion rule given as a Python callable cannot be serialised; pass regexes instead")

    def __repr__(self) -> str:
        detail = {"regex": self.patterns, "predicate": self.predicate}.get(self.kind, "")
        return f"ExclusionRule({self.kind!r}{', ' + repr(detail) if detail else ''})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ExclusionRule)
            and (self.kind, self.patterns, self.predicate) == (other.kind, other.patterns, other.predicate)
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.patterns))


def resolve_exclusion(spec: ExclusionSpec, argument: str = "exclude") -> ExclusionRule:
    """Turns a user's exclusion argument into an :class:`ExclusionRule`.

    Args:
        spec: ``None`` for the default rule; ``False`` or ``[]`` to exclude
            nothing; a regex string or a list of regex strings matched with
            ``re.search`` on the full path; a callable ``(name, shape) -> bool``;
            or an ``ExclusionRule``. A user rule replaces the default one.
        argument: the argument name used in error messages
            (``exclude_from_weight_decay`` or ``exclude_from_layer_adaptation``).

    Raises:
        ValueError: naming ``argument``, for any other type or an invalid regex.
    """
    if isinstance(spec, ExclusionRule):
        return spec
    if spec is None:
        return ExclusionRule("default")
    if spec is False:
        return ExclusionRule("none")
    if isinstance(spec, str):
        spec = [spec]
    if callable(spec):
        return ExclusionRule("predicate", predicate=spec)
    if isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping)):
        patterns = tuple(spec)
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ValueError(f"{argument} must hold regex strings, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{argument} has an invalid regex {pattern!r}: {err}") from None
        return ExclusionRule("regex", patterns) if patterns else ExclusionRule("none")
    raise ValueError(
        f"{argument} must be None (default rule), False, a regex, a list of regexes "
        f"or a callable (name, shape) -> bool; got {spec!r}"
    )
