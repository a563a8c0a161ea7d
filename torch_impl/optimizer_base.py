"""Bookkeeping shared by the package's torch optimizers: param groups, per-tensor switches, non-finite policy.

The classes in ``sgd.py``, ``lars.py``, ``clars.py`` and ``lamb.py`` derive
from :class:`LargeBatchOptimizer`, which

* accepts tensors, ``(name, tensor)`` pairs (then the exclusion rules see the
  full names, e.g. ``layer1.0.bn1.weight``) or param-group dicts, and refuses
  a tensor passed twice (in one group or across groups; also in
  ``add_param_group``), naming both places;
* validates every hyperparameter, of the constructor and of each group,
  through the core records of :mod:`hvd_largebatch.config`, so the PyTorch and
  Keras optimizers reject the same input with the same message;
* stores every hyperparameter *and* the per-tensor switches ``decay_mask``
  and ``adapt_mask`` (ALGORITHMS.md: whether weight decay / the trust ratio
  apply) in ``param_groups``. ``horovod.torch.DistributedOptimizer`` rebuilds
  the optimizer class from ``param_groups`` alone, and keeps them;
* checks the gradients before touching anything: with ``nonfinite="skip"``
  (default) a step whose gradients hold NaN or Inf changes no weight and no
  state and adds one to :attr:`LargeBatchOptimizer.skipped_steps`; under
  Horovod the gradients are averaged before ``step()``, so every rank takes
  the same decision. A skipped step warns (``RuntimeWarning``, on rank 0
  under Horovod) at the first skip and then at every 100th
  (``SKIP_WARNING_EVERY``), with the running count; the warning reads the
  Python counter, so it adds no device synchronisation.
  ``nonfinite="raise"`` raises ``FloatingPointError``.
  The check reads the gradient norms (one pass over the gradients that LARS
  needs anyway), so a finite gradient whose norm overflows the dtype is
  treated as non-finite too;
* accepts float16/bfloat16 parameters: their gradient norms, the update
  math and their state (velocity, Adam moments) are float32, the weight is
  rounded to its dtype once per step (``mixed_precision.py``); a state dict
  loaded into such an optimizer keeps that state float32 (torch's loader
  would cast it to the parameter's dtype);
* records the per-tensor trust ratios of the last step on request
  (:meth:`LargeBatchOptimizer.record_trust_ratios`), at no cost when off.

Subclasses fill in ``_init_state`` and ``_apply_group`` (the math lives in
``momentum_functional.py`` and ``lamb_functional.py``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from hvd_largebatch import config, errors
from hvd_largebatch.torch_impl.distributed import horovod_rank
from hvd_largebatch.torch_impl.mixed_precision import HALF_DTYPES, state_dtype
from hvd_largebatch.torch_impl import cpu_kernels
from hvd_largebatch.torch_impl.tensor_lists import group_by_device_and_dtype, tensor_norms

__all__ = ["LargeBatchOptimizer", "GroupWork", "constructor_defaults"]

DECAY_MASK = "decay_mask"
ADAPT_MASK = "adapt_mask"
_PARAMS_HELP = "params must be an iterable of tensors, of (name, tensor) pairs, or of param-group dicts"


@dataclasses.dataclass
class GroupWork:
    """What one param group contributes to a step: the tensors that have gradients.

    Attributes:
        positions: indices into ``group["params"]`` of the tensors with a gradient.
        params, grads: those tensors and their gradients.
        grad_norms: ``||g||`` per tensor (0-d tensors); the non-finite check reads them.
        rate_norms: the norms the trust ratio divides by (``||g||`` for LARS,
            the per-example mean ``s`` for CLARS), or None.
        weight_norms: ``||w||`` per tensor when the check read them with
            ``||g||`` (``fused="numba"`` on an optimizer that adapts), else None.
    """

    positions: list[int]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    grad_norms: list[torch.Tensor]
    rate_norms: list[torch.Tensor] | None = None
    weight_norms: list[torch.Tensor] | None = None


#: The torch-only switches of the update path, each None (the default: on where it applies), True or False;
#: ``fused`` also takes ``"numba"`` (:mod:`hvd_largebatch.torch_impl.cpu_kernels`).
PATH_SWITCHES = ("foreach", "fused")
#: Constructor arguments that are not group hyperparameters.
_NOT_DEFAULTS = frozenset({"self", "params", "exclude_from_weight_decay", "exclude_from_layer_adaptation", "__class__"})


def _check_path_switches(group: Mapping[str, Any]) -> None:
    for key in PATH_SWITCHES:
        value = group.get(key)
        if key == "fused" and value == cpu_kernels.NUMBA:
            cpu_kernels.require()  # a missing numba fails here, before any step
        elif value is not None and not isinstance(value, bool):
            allowed = "None, True, False or 'numba'" if key == "fused" else "None, True or False"
            raise ValueError(f"{key} must be {allowed}, got {value!r}")


def constructor_defaults(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A constructor's ``locals()`` as its group defaults: every argument but ``params`` and the exclusion rules.

    Each optimizer's signature names its hyperparameters once; this turns
    them into the ``defaults`` of :class:`torch.optim.Optimizer` without
    writing each name a second time.
    """
    return {key: value for key, value in arguments.items() if key not in _NOT_DEFAULTS}


def _is_named_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)


def _check_param_list(items: Any, where: str) -> list:
    if isinstance(items, torch.Tensor):
        return [items]
    if isinstance(items, (str, bytes, Mapping, set)) or not isinstance(items, Iterable):
        raise ValueError(f"{_PARAMS_HELP}; {where} is {type(items).__name__}")
    items = list(items)
    tensors = sum(isinstance(item, torch.Tensor) for item in items)
    pairs = sum(_is_named_pair(item) for item in items)
    if tensors + pairs != len(items) or (tensors and pairs):
        bad = next((i for i in items if not isinstance(i, torch.Tensor) and not _is_named_pair(i)), None)
        detail = f"found {bad!r}" if bad is not None else "found tensors mixed with (name, tensor) pairs"
        raise ValueError(f"{_PARAMS_HELP}; {where} {detail}")
    return items


def checked_params(params: Any) -> list:
    """Validates the ``params`` argument and returns it as a list (tensors, pairs or group dicts).

    Raises:
        ValueError: naming ``params`` for a single tensor, a non-iterable, an
            empty list, mixed kinds, or a group dict without ``"params"``.
    """
    if isinstance(params, torch.Tensor):
        raise ValueError(f"{_PARAMS_HELP}, not a single tensor; wrap it in a list")
    if isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise ValueError(f"{_PARAMS_HELP}; got {type(params).__name__}")
    items = list(params)
    if not items:
        raise ValueError("params must not be empty (the optimizer got an empty parameter list)")
    if all(isinstance(item, Mapping) for item in items):
        groups = []
        for index, group in enumerate(items):
            if "params" not in group:
                raise ValueError(f"params: param group {index} has no 'params' entry")
            group = dict(group)
            group["params"] = _check_param_list(group["params"], f"param group {index}'s 'params'")
            if not group["params"]:
                raise ValueError(f"params: param group {index} is empty")
            groups.append(group)
        return groups
    if any(isinstance(item, Mapping) for item in items):
        raise ValueError(f"{_PARAMS_HELP}; found param-group dicts mixed with tensors")
    return _check_param_list(items, "the list")


class LargeBatchOptimizer(torch.optim.Optimizer):
    """Base of :class:`SGD`, :class:`LARS`, :class:`CLARS` and :class:`LAMB`; not used directly.

    The arguments every subclass shares:

    * ``foreach``: run the update as ``torch._foreach_*`` ops over cache-sized
      chunks (None, the default: yes; False: one tensor at a time).
    * ``fused``: ``True``: where torch's fused kernel computes the rule
      exactly (see ``momentum_functional.py``), update each tensor in one
      pass of it. ``"numba"``: on CPU float32/float64 tensors, single-pass
      loops compiled by numba for every optimizer, LAMB included, and the
      check's norms read two streams at a time (``cpu_kernels.py``; needs
      numba); the other tensors as ``True``. ``None`` (the default):
      ``"numba"`` when torch runs one intra-op thread, the group holds a CPU
      tensor and numba imports, else ``True``. ``False``: neither. float64
      results of every path equal each other to rounding.
    * ``nonfinite``: ``"skip"`` (default) or ``"raise"`` on a NaN/Inf gradient.

    Every constructor raises ``ValueError`` naming the argument for a value out of range.

    Attributes:
        skipped_steps: steps skipped because a gradient was not finite (saved
            in ``state_dict()`` under ``"skipped_steps"``).
    """

    #: The core record (``hvd_largebatch.config``) that validates a group.
    config_type: ClassVar[type]
    #: Whether the optimizer has a trust ratio (and so an ``adapt_mask``).
    uses_adaptation: ClassVar[bool] = True
    #: A skipped step warns at the first skip and then at every this-many-th (see the module doc).
    SKIP_WARNING_EVERY: ClassVar[int] = 100

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        exclude_from_weight_decay: config.ExclusionSpec = None,
        exclude_from_layer_adaptation: config.ExclusionSpec = None,
    ) -> None:
        _check_path_switches(defaults)
        self._record_from_group(defaults)  # the constructor's own arguments, even if every group overrides them
        self._decay_rule = config.resolve_exclusion(exclude_from_weight_decay, "exclude_from_weight_decay")
        self._adapt_rule = (
            config.resolve_exclusion(exclude_from_layer_adaptation, "exclude_from_layer_adaptation")
            if self.uses_adaptation
            else None
        )
        self.skipped_steps = 0
        self._recording_trust_ratios = False
        self._last_trust_ratios: list[tuple[str, torch.Tensor]] = []
        super().__init__(checked_params(params), defaults)

    # ------------------------------------------------------------------
    # Param groups
    # ------------------------------------------------------------------
    def _record_kwargs(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The core record's fields, read from a group (subclasses map their own spelling)."""
        return {f.name: group[f.name] for f in dataclasses.fields(self.config_type) if f.name in group}

    def _write_record(self, group: dict[str, Any], record: Any) -> None:
        """Writes the validated (normalised) values back into the group."""
        for field in dataclasses.fields(record):
            group[field.name] = getattr(record, field.name)

    def _record_from_group(self, group: Mapping[str, Any]) -> Any:
        return self.config_type(**self._record_kwargs(group))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group, validating its hyperparameters and deciding its per-tensor switches.

        A group that already carries ``decay_mask`` / ``adapt_mask`` (for
        example one handed over by ``horovod.torch.DistributedOptimizer``)
        keeps them; otherwise they come from this optimizer's exclusion rules.
        """
        if isinstance(param_group, Mapping) and "params" in param_group:
            param_group["params"] = _check_param_list(param_group["params"], "the group's 'params'")
            self._refuse_duplicates(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _refuse_duplicates(self, param_group: Mapping[str, Any]) -> None:
        """Raises the core's duplicate-tensor error if a tensor of the new group is already in this or an earlier group."""
        def place(name: str | None, g: int, i: int) -> str:
            return f"param_groups[{g}][{i}]" if name is None else f"{name!r} at param_groups[{g}][{i}]"

        seen = {}
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, tensor in enumerate(group["params"]):
                seen[id(tensor)] = place(None if names is None else names[i], g, i)
        g = len(self.param_groups)
        names = param_group.get("param_names")
        for i, item in enumerate(param_group["params"]):
            if _is_named_pair(item):
                name, tensor = item
            else:
                name, tensor = (names[i] if names is not None and i < len(names) else None), item
            if id(tensor) in seen:
                raise errors.duplicate_tensor(seen[id(tensor)], place(name, g, i))
            seen[id(tensor)] = place(name, g, i)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _check_path_switches(group)
        self._write_record(group, self._record_from_group(group))
        first = self.param_groups[0]
        if group["nonfinite"] != first["nonfinite"]:
            raise ValueError(
                f"nonfinite must be the same for every param group (the whole step is skipped or not), "
                f"got {group['nonfinite']!r} and {first['nonfinite']!r}"
            )
        masks = [(DECAY_MASK, self._decay_rule, "exclude_from_weight_decay")]
        if self.uses_adaptation:
            masks.append((ADAPT_MASK, self._adapt_rule, "exclude_from_layer_adaptation"))
        names = group.get("param_names")
        for key, rule, argument in masks:
            if key in group:
                mask = group[key]
                if not isinstance(mask, (list, tuple)) or len(mask) != len(group["params"]) or not all(
                    isinstance(flag, bool) for flag in mask
                ):
                    raise ValueError(f"{key} must be a list of one bool per tensor of the group, got {mask!r}")
                group[key] = list(mask)
                continue
            if names is None and rule.kind == "regex":
                raise ValueError(
                    f"{argument} is a list of regexes, which match parameter names: pass "
                    f"model.named_parameters() (or (name, tensor) pairs) as params"
                )
            group[key] = [
                not rule("" if names is None else names[i], tuple(p.shape)) for i, p in enumerate(group["params"])
            ]

    def tensor_switches(self) -> list[dict[str, Any]]:
        """The per-tensor decisions, one dict per tensor: ``name``, ``shape``, ``decay``, ``adapt``.

        Unnamed tensors are called ``param_groups[g][i]``.
        """
        rows = []
        for name, group, i in self._named_slots():
            param = group["params"][i]
            rows.append({
                "name": name,
                "shape": tuple(param.shape),
                "decay": group[DECAY_MASK][i],
                "adapt": group[ADAPT_MASK][i] if self.uses_adaptation else False,
            })
        return rows

    def _named_slots(self) -> Iterable[tuple[str, dict[str, Any], int]]:
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i in range(len(group["params"])):
                yield (names[i] if names is not None else f"param_groups[{g}][{i}]"), group, i

    # ------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------
    @staticmethod
    def _foreach(group: Mapping[str, Any]) -> bool:
        return group.get("foreach") is not False

    @staticmethod
    def _fused(group: Mapping[str, Any]) -> bool | str:
        """The group's fused path: True (torch's kernels where they compute its rule), False, or ``"numba"``.

        None resolves here, at every step: ``"numba"`` where :func:`cpu_kernels.default_on` says so, else True.
        """
        fused = group.get("fused")
        if fused is None:
            return cpu_kernels.NUMBA if cpu_kernels.default_on(group["params"]) else True
        return fused

    #: Whether the trust ratio reads ``||w||`` before the update (LARS, CLARS), so the check reads it with ``||g||``.
    _reads_weight_norms_first = False

    def _gather(self, group: dict[str, Any]) -> GroupWork:
        positions, params, grads = [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            positions.append(i)
            params.append(p)
            grads.append(p.grad)
        if self._fused(group) != cpu_kernels.NUMBA:
            return GroupWork(positions, params, grads, tensor_norms(grads, self._foreach(group)))
        if self._reads_weight_norms_first:
            weight_norms, grad_norms = cpu_kernels.weight_and_grad_norms(params, grads)
            return GroupWork(positions, params, grads, grad_norms, weight_norms=weight_norms)
        return GroupWork(positions, params, grads, cpu_kernels.grad_norms(grads))

    def _resolve_rate_norms(self, work: list[GroupWork]) -> None:
        """Fills ``rate_norms`` of each group (LARS: ``||g||``; CLARS: ``s``); SGD and LAMB need none."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one update, or skips it when a gradient is not finite (see the module doc).

        Args:
            closure: optional, re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # a scheduler or the user may have written it
            group["lr"] = config.check_non_negative("lr", group["lr"])
        work = [self._gather(group) for group in self.param_groups]
        self._resolve_rate_norms(work)
        if not _all_finite(w.grad_norms + (w.rate_norms or []) for w in work):
            if self.param_groups[0]["nonfinite"] == "raise":
                raise FloatingPointError(
                    f"{type(self).__name__}: a gradient holds NaN or Inf (nonfinite='raise'); weights untouched"
                )
            self.skipped_steps += 1
            self._report_skip()
            return loss
        recorded: list[tuple[str, torch.Tensor]] = []
        for g, (group, group_work) in enumerate(zip(self.param_groups, work)):
            if not group_work.params:
                continue
            out = [None] * len(group_work.params) if self._recording_trust_ratios else None
            self._apply_group(group, group_work, out)
            if out is not None:
                names = group.get("param_names")
                recorded += [
                    (names[i] if names is not None else f"param_groups[{g}][{i}]", ratio)
                    for i, ratio in zip(group_work.positions, out)
                ]
        if self._recording_trust_ratios:
            self._last_trust_ratios = recorded
        return loss

    def _report_skip(self) -> None:
        """Warns (on rank 0 under Horovod) at the first skipped step and then every ``SKIP_WARNING_EVERY``-th.

        Reads only the Python counter :attr:`skipped_steps`: no device synchronisation
        beyond the one the non-finite check already made.
        """
        count = self.skipped_steps
        if (count == 1 or count % self.SKIP_WARNING_EVERY == 0) and horovod_rank() == 0:
            warnings.warn(
                f"{type(self).__name__}: skipped an update because a gradient holds NaN or Inf (weights and "
                f"optimizer state untouched); {count} update(s) skipped so far (optimizer.skipped_steps). "
                f"Warned at the first skip and every {self.SKIP_WARNING_EVERY}th; pass nonfinite='raise' to stop instead",
                RuntimeWarning,
                stacklevel=4,  # the user's opt.step(), past step() and torch's no_grad wrapper
            )

    def _apply_group(self, group: dict[str, Any], work: GroupWork, ratios_out: list | None) -> None:
        """The update rule for one parameter group: every subclass defines it."""
        raise NotImplementedError(f"{type(self).__name__} must implement _apply_group (its update rule)")

    # ------------------------------------------------------------------
    # Trust-ratio statistics
    # ------------------------------------------------------------------
    def record_trust_ratios(self, enabled: bool = True) -> None:
        """Starts (or stops) keeping each step's per-tensor trust ratios for :meth:`trust_ratios`.

        Off by default; when off nothing is kept or computed beyond the update itself.
        """
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True or False, got {enabled!r}")
        if not self.uses_adaptation and enabled:
            raise ValueError(f"{type(self).__name__} has no trust ratio to record")
        self._recording_trust_ratios = enabled
        if not enabled:
            self._last_trust_ratios = []

    def trust_ratios(self) -> dict[str, float]:
        """The trust ratios of the last applied step, by tensor name (empty when not recording).

        LARS/LARC/CLARS report the local rate ``lambda``; LAMB reports ``r``.
        Tensors excluded from adaptation report 1. Reading them synchronises
        with the device once.
        """
        if not self._last_trust_ratios:
            return {}
        values = torch.stack([r.detach().to("cpu", torch.float64) for _, r in self._last_trust_ratios]).tolist()
        return {name: value for (name, _), value in zip(self._last_trust_ratios, values)}

    # ------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus ``"skipped_steps"``."""
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a state dict from :meth:`state_dict` (a plain torch one counts zero skips)."""
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        super().load_state_dict(state_dict)
        self._restore_float32_state(state_dict)
        for group in self.param_groups:
            self._validate_group(group)
        self.skipped_steps = int(skipped)

    def _restore_float32_state(self, state_dict: Mapping[str, Any]) -> None:
        """Re-reads the state of half-precision params from ``state_dict`` as float32.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state
        to the parameter's dtype, which for a float16/bfloat16 parameter
        would round (and can overflow or flush) the float32 velocity and moments.
        """
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if param.dtype not in HALF_DTYPES or not saved:
                continue
            for key, value in saved.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, dtype=state_dtype(param), copy=True)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            _decay_rule=self._decay_rule,
            _adapt_rule=self._adapt_rule,
            skipped_steps=self.skipped_steps,
            _recording_trust_ratios=self._recording_trust_ratios,
            _last_trust_ratios=[],
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_recording_trust_ratios", False)
        self.__dict__.setdefault("_last_trust_ratios", [])
        self.__dict__.setdefault("_decay_rule", config.resolve_exclusion(None))
        self.__dict__.setdefault("_adapt_rule", config.resolve_exclusion(None) if self.uses_adaptation else None)


def _all_finite(norm_lists: Iterable[list[torch.Tensor]]) -> bool:
    """Whether every norm is finite, with one host synchronisation per device."""
    norms = [norm for norm_list in norm_lists for norm in norm_list]
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for bucket in group_by_device_and_dtype(norms):
        stacked = torch.stack([norms[i] for i in bucket])
        flags.setdefault(stacked.device, []).append(torch.isfinite(stacked).all())
    return all(bool(torch.stack(device_flags).all()) for device_flags in flags.values())
