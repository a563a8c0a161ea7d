"""ConAdv for PyTorch: adversarial examples from stale weights, computed concurrently with the step.

Concurrent adversarial learning (Liu, You et al., "Concurrent Adversarial
Learning for Large-Batch Training", ICLR 2022) adds to every step's clean loss
the loss on adversarial examples, and makes them cheap by computing the
perturbation of batch ``t`` from the *stale* weights ``theta_{t-tau}``: it
then does not wait for step ``t - 1``'s update and runs concurrently with the
gradient work of step ``t - tau``. For each step ``t`` (ALGORITHMS.md, ConAdv)::

    loss_t = mean CE(theta_t; x_t, y_t)                          # clean, main BN
           + adv_weight * mean CE(theta_t; xadv_t, y_t)          # auxiliary BN if dual_bn
    xadv_t = clip(x_t + delta0 - s * alpha * sign(grad_x CE(theta_{t-tau}; x_t + delta0, y')),
                  x_t - epsilon, x_t + epsilon, input_range)     # repeated attack_iters times

with ``s = +1, y' = `` a random wrong label when ``targeted`` (descend toward
it, as the official code) and ``s = -1, y' = y_t`` otherwise (ascend the loss),
and ``delta0`` uniform in ``[-epsilon, epsilon]`` for each example with
probability ``random_start_prob``, else 0.

How this module does it, per call of :meth:`ConAdv.loss` at step ``t``:

1. take ``xadv_t``: launched ``tau`` steps ago (see 3), or, if batch ``t`` was
   not known then (first steps, an epoch boundary, no ``ahead``), computed now
   from the snapshot that holds ``theta_{t-tau}``. For ``t < tau`` there are no
   stale weights yet and ``theta_t`` is used; ``tau = 0`` is ordinary
   sequential adversarial training.
2. refresh a snapshot with ``theta_t`` (a private deep copy of the model, one
   per slot of a ring of ``tau`` slots, parameters copied in place). The
   attack only ever runs on a snapshot, never on the live model: the live
   parameters can be updated by ``optimizer.step()`` while it runs, and the
   snapshot's BatchNorm running statistics never reach the live model.
3. launch the perturbation of ``ahead`` (batch ``t + tau``) from that snapshot:
   on a background thread on CPU (PyTorch kernels release the GIL), or on a
   side CUDA stream on GPU (kernels of both streams can run at once). It runs
   while the caller does this step's forward, ``backward()`` (with Horovod,
   the allreduce) and ``optimizer.step()``. On CPU it needs a free core:
   measured on the bench model (2 cores, ``benchmarks/conadv_step_time.py``)
   with ``torch.set_num_threads(1)`` it hid 88% (batch 256) to all (batch
   1024) of the attack's time, leaving ConAdv at 1.9x / 2.1x a clean step
   instead of 2.6x / 3.0x; with 2 intra-op threads the cores are already
   busy and it hid 0% / 35%. On GPU the attack is enqueued from the calling
   thread, so its kernel-launch time is not hidden, only its GPU time.
4. return ``clean + adv_weight * adversarial`` for the caller's ``backward()``;
   with Horovod's or the package's ``DistributedOptimizer`` the adversarial
   term is part of the gradient that is averaged, like any loss term.

Example (any optimizer of the package; Horovod optional)::

    from hvd_largebatch.torch_impl import ConAdv, LARS, convert_to_dual_bn
    model = convert_to_dual_bn(model)             # before building the optimizer
    opt = LARS(model.named_parameters(), lr=1.0)
    conadv = ConAdv(model, F.cross_entropy, epsilon=0.1, step_size=0.1, input_range=None)
    for (x, y), ahead in conadv.lookahead(loader):  # ahead: batch t + staleness, or None
        opt.zero_grad()
        loss = conadv.loss(x, y, ahead)
        loss.backward()
        opt.step()
    conadv.close()

Notes where we differ from, or read, the paper:
    * The attack runs the model in its current mode (training: BatchNorm on
      batch statistics) through the BatchNorm the adversarial loss uses (the
      auxiliary one with ``dual_bn``), so it attacks the very loss term it
      feeds, at stale weights. Dropout in the snapshot draws from PyTorch's
      global generator; ConAdv's own draws (random start, targets) come from a
      private ``torch.Generator`` seeded by ``seed``, so they are reproducible
      and do not depend on thread timing. Under Horovod pass a rank-dependent
      ``seed`` if you want different noise on each rank.
    * ``random_start_prob`` is applied per example (the official code's
      granularity is not stated in the paper; this is our reading).
    * The first ``tau`` steps have no stale weights and use the current ones.
    * ``average_losses`` (ours; off by default, which is ALGORITHMS.md's sum)
      trains on ``(clean + adv_weight * adversarial) / (1 + adv_weight)``.
      With LARS/LAMB the sum leaves the adapted layers' steps unchanged (the
      trust ratio normalises the gradient) but doubles the steps of the
      tensors they do not adapt (biases, BatchNorm), which take the raw global
      LR. Measured on MNIST-1D (8,000 signals, batch 2048, 90 steps, LARS at
      peak LR 32, seeds 0/1): LARS alone 96.0/96.0% test accuracy; ConAdv +
      LARS with the sum 67.7/76.8% (epsilon 0.35); with the mean 93.7%
      (epsilon 0.35, seed 0) and 97.0/96.2% (epsilon 0.1).
    * Do not modify batches in place after the lookahead has yielded them: the
      attack may be reading them on the background thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hvd_largebatch.config import ConAdvConfig, check_non_negative_int
from hvd_largebatch.errors import plain_batchnorm_with_dual_bn
from hvd_largebatch.torch_impl.dual_bn import auxiliary_bn, plain_bn_layers

__all__ = ["ConAdv", "make_adversarial_examples", "lookahead"]

_DEFAULTS = ConAdvConfig()
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = Any


def make_adversarial_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    *,
    epsilon: float = _DEFAULTS.epsilon,
    step_size: float = _DEFAULTS.step_size,
    attack_iters: int = _DEFAULTS.attack_iters,
    random_start_prob: float = _DEFAULTS.random_start_prob,
    targeted: bool = _DEFAULTS.targeted,
    input_range: tuple[float, float] | None = _DEFAULTS.input_range,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Signed-gradient (FGSM/PGD-style) adversarial examples of ``x`` for ``model``.

    ``xadv = clip(x + delta0 + sum_k s * step_size * sign(grad_x loss_fn(model(xadv_k), y')))``,
    clipped after each of the ``attack_iters`` steps to ``[x - epsilon, x + epsilon]``
    and then to ``input_range``. ``targeted``: ``y'`` is a random wrong class
    (``(y + U{1..C-1}) mod C``) and ``s = -1`` (descend toward it); otherwise
    ``y' = y`` and ``s = +1``. ``delta0`` is uniform in ``[-epsilon, epsilon]``
    for each example with probability ``random_start_prob``, else 0. A
    non-finite gradient component contributes no step (never NaN in the output).

    The model is called as it is (its mode and BatchNorm routing are the
    caller's); only the input gets a gradient, and parameters that require
    grad receive none.

    Args:
        model: maps ``x`` to logits ``(N, C)``.
        x: floating inputs, first dimension the batch.
        y: integer class labels ``(N,)`` (``loss_fn`` decides what it accepts
            in untargeted mode; targeted mode needs class indices).
        loss_fn: ``loss_fn(logits, labels)`` -> scalar mean loss.
        generator: source of the random start and of the target labels.

    Returns:
        The adversarial inputs, detached, same shape and dtype as ``x``.

    Raises:
        ValueError: a hyperparameter out of range (from ``ConAdvConfig``), ``x``
            not floating, or targeted mode without integer labels.
    """
    cfg = ConAdvConfig.from_arguments(locals())  # the fields not taken here (staleness, ...) do not matter
    _check_batch(x, y, cfg.targeted)
    return _attack(model, loss_fn, x, y, cfg, generator)


def _check_batch(x: Any, y: Any, targeted: bool) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point torch.Tensor, got {_describe(x)}")
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y must be a torch.Tensor, got {_describe(y)}")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if targeted and (y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
        raise ValueError(f"targeted=True needs y as integer class labels of shape (N,), got {_describe(y)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


def _attack(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ConAdvConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The attack of :func:`make_adversarial_examples`, without argument checks."""
    x0 = x.detach()
    eps = cfg.epsilon
    direction = -cfg.step_size if cfg.targeted else cfg.step_size

    def clip(candidate: torch.Tensor) -> torch.Tensor:
        candidate = torch.clamp(candidate, x0 - eps, x0 + eps)
        if cfg.input_range is not None:
            candidate = torch.clamp(candidate, cfg.input_range[0], cfg.input_range[1])
        return candidate

    if cfg.random_start_prob > 0:
        per_example = (x0.shape[0],) + (1,) * (x0.dim() - 1)
        starts = torch.rand(per_example, generator=generator, device=x0.device, dtype=x0.dtype) < cfg.random_start_prob
        noise = (torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1) * eps
        x_adv = clip(x0 + noise * starts)
    else:
        x_adv = x0.clone()
    target = y
    with torch.enable_grad():
        for iteration in range(cfg.attack_iters):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            if cfg.targeted and iteration == 0:
                num_classes = logits.shape[-1]
                if num_classes < 2:
                    raise ValueError(f"targeted=True needs at least 2 classes, the model outputs {num_classes}")
                shift = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
                target = (y + shift) % num_classes
            (grad,) = torch.autograd.grad(loss_fn(logits, target), x_adv)
            step = torch.where(torch.isfinite(grad), torch.sign(grad), torch.zeros_like(grad))
            x_adv = clip(x_adv.detach() + direction * step)
    return x_adv.detach()


def lookahead(
    iterable: Iterable[Batch], staleness: int = _DEFAULTS.staleness, device: torch.device | str | None = None
) -> Iterator[tuple[Batch, Batch | None]]:
    """Yields ``(batch_t, batch_{t+staleness})`` so that batch ``t + tau`` is known at step ``t``.

    Reads ``staleness`` batches ahead of the one it yields; the second element
    is None for ``staleness = 0`` and for the last ``staleness`` batches. The
    ahead batch is the same object that is yielded as current ``staleness``
    steps later. With ``device``, tensors in each batch (tuple, list, dict or a
    tensor) are moved there with ``non_blocking=True`` when read, i.e. ahead of use.

    Raises:
        ValueError: ``staleness`` not an integer >= 0.
    """
    staleness = ConAdvConfig(staleness=staleness).staleness
    return _lookahead(iter(iterable), staleness, device)


def _lookahead(iterator: Iterator[Batch], staleness: int, device) -> Iterator[tuple[Batch, Batch | None]]:
    buffer: collections.deque = collections.deque()
    done = False

    def read() -> None:
        nonlocal done
        if done:
            return
        try:
            buffer.append(_to_device(next(iterator), device))
        except StopIteration:
            done = True

    for _ in range(staleness + 1):
        read()
    while buffer:
        current = buffer.popleft()
        ahead = buffer[staleness - 1] if staleness > 0 and len(buffer) >= staleness else None
        yield current, ahead
        read()


def _to_device(batch: Batch, device) -> Batch:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: _to_device(item, device) for key, item in batch.items()}
    return batch


class _Snapshot:
    """A private copy of the model that holds the weights of one step (``step``)."""

    def __init__(self, model: nn.Module) -> None:
        self.module = copy.deepcopy(model)
        for param in self.module.parameters():
            param.grad = None
            param.requires_grad_(False)  # the attack needs input gradients only
        self.step: int | None = None
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())

    def refresh(self, model: nn.Module, step: int) -> None:
        live_params, live_buffers = list(model.parameters()), list(model.buffers())
        if len(live_params) != len(self._params) or len(live_buffers) != len(self._buffers):
            raise RuntimeError(
                "the model's parameters or buffers changed after ConAdv was built "
                "(convert BatchNorm layers and change the model before creating ConAdv)"
            )
        with torch.no_grad():
            torch._foreach_copy_(self._params, [p.detach() for p in live_params])
            if self._buffers:
                torch._foreach_copy_(self._buffers, live_buffers)
        self.module.train(model.training)
        self.step = step


class _DoneJob:
    def __init__(self, value: torch.Tensor) -> None:
        self._value = value

    def result(self) -> torch.Tensor:
        return self._value

    def done(self) -> bool:
        return True


class _StreamJob:
    """An attack enqueued on a side CUDA stream; ``result()`` makes the caller's stream wait for it."""

    def __init__(self, stream: torch.cuda.Stream, fn: Callable[..., torch.Tensor], *args: Any) -> None:
        caller = torch.cuda.current_stream(stream.device)
        stream.wait_stream(caller)  # the snapshot refresh and the batch copy happened on the caller's stream
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.is_cuda:
                arg.record_stream(stream)
        with torch.cuda.stream(stream):
            self._value = fn(*args)
        self._stream = stream

    def result(self) -> torch.Tensor:
        caller = torch.cuda.current_stream(self._stream.device)
        caller.wait_stream(self._stream)
        self._value.record_stream(caller)
        return self._value

    def done(self) -> bool:
        return self._stream.query()


class ConAdv:
    """Concurrent adversarial learning as a step helper for an ordinary PyTorch training loop.

    ``loss(x, y, ahead)`` returns ``clean + adv_weight * adversarial`` for the
    batch ``(x, y)`` of step ``t`` and launches the perturbation of ``ahead``
    (batch ``t + staleness``) from the weights ``theta_t``, to run while the
    caller does ``backward()`` and ``optimizer.step()`` (see the module
    docstring for the full rule, the paper reference and where we differ).

    Args:
        model: the model being trained; it must output logits ``(N, C)``. With
            ``dual_bn=True`` its BatchNorm layers must be dual
            (:func:`~hvd_largebatch.torch_impl.dual_bn.convert_to_dual_bn`,
            called before building the optimizer); a model without BatchNorm is fine.
        loss_fn: ``loss_fn(logits, labels)`` -> scalar mean loss, for the clean,
            the adversarial and the attack losses (default cross-entropy).
        epsilon, step_size, staleness, attack_iters, random_start_prob, targeted,
            adv_weight, dual_bn, input_range, average_losses: the ConAdv
            hyperparameters of ``hvd_largebatch.config.ConAdvConfig`` (same
            defaults and checks). ``average_losses=True`` returns
            ``(clean + adv_weight * adversarial) / (1 + adv_weight)``.
            ``input_range`` must contain the data (it is checked on the first
            batch); pass None for unbounded inputs such as standardised signals.
        concurrent: run the attack of the ahead batch concurrently (a
            background thread on CPU, a side CUDA stream when the model is on a
            GPU). False computes it on the spot: same numbers, no overlap.
        seed: seed of ConAdv's private generator (random start and target labels);
            None draws one from PyTorch's global generator.

    Attributes:
        config: the validated ``ConAdvConfig``.
        step: the number of ``loss()`` calls so far (the step ``t`` of the next call).
        last_adversarial: the adversarial inputs used by the last ``loss()``.
        last_clean_loss, last_adversarial_loss: its two terms (detached tensors).

    Raises:
        ValueError: a bad argument, naming it and the allowed values.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn = F.cross_entropy,
        *,
        epsilon: float = _DEFAULTS.epsilon,
        step_size: float = _DEFAULTS.step_size,
        staleness: int = _DEFAULTS.staleness,
        attack_iters: int = _DEFAULTS.attack_iters,
        random_start_prob: float = _DEFAULTS.random_start_prob,
        targeted: bool = _DEFAULTS.targeted,
        adv_weight: float = _DEFAULTS.adv_weight,
        dual_bn: bool = _DEFAULTS.dual_bn,
        input_range: tuple[float, float] | None = _DEFAULTS.input_range,
        average_losses: bool = _DEFAULTS.average_losses,
        concurrent: bool = True,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable (logits, labels) -> scalar loss, got {loss_fn!r}")
        if not isinstance(concurrent, bool):
            raise ValueError(f"concurrent must be True or False, got {concurrent!r}")
        if seed is not None:
            seed = check_non_negative_int("seed", seed)
        self.config = ConAdvConfig.from_arguments(locals())
        plain = plain_bn_layers(model)
        if self.config.dual_bn and plain:
            names = [name or type(module).__name__ for name, module in model.named_modules() if module in plain]
            raise plain_batchnorm_with_dual_bn("hvd_largebatch.torch_impl", names)
        self.model = model
        self.loss_fn = loss_fn
        self.concurrent = concurrent
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        self.step = 0
        self.last_adversarial: torch.Tensor | None = None
        self.last_clean_loss: torch.Tensor | None = None
        self.last_adversarial_loss: torch.Tensor | None = None
        self._snapshots = [_Snapshot(model) for _ in range(max(self.config.staleness, 1))]
        self._pending: dict[int, tuple[torch.Tensor, int, Any]] = {}  # step -> (x, slot, job)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._checked_range = False

    # -- public API ----------------------------------------------------------------------------
    @property
    def staleness(self) -> int:
        return self.config.staleness

    @property
    def dual_bn(self) -> bool:
        return self.config.dual_bn

    def lookahead(
        self, iterable: Iterable[Batch], device: torch.device | str | None = None
    ) -> Iterator[tuple[Batch, Batch | None]]:
        """:func:`lookahead` with this helper's ``staleness``: yields ``(batch_t, batch_{t+staleness})``."""
        return lookahead(iterable, self.config.staleness, device)

    def loss(self, x: torch.Tensor, y: torch.Tensor, ahead: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Step ``t``'s loss ``clean + adv_weight * adversarial``, launching the attack of ``ahead``.

        (Divided by ``1 + adv_weight`` with ``average_losses``.)

        Args:
            x, y: the batch of this step.
            ahead: the batch ``(x, y)`` of step ``t + staleness`` (what
                :meth:`lookahead` yields), or None when it is not known; it
                must be None when ``staleness == 0``.

        Returns:
            The scalar loss, with the autograd graph for the caller's ``backward()``.

        Raises:
            ValueError: malformed batches, data outside ``input_range``, an
                ``ahead`` with ``staleness == 0``, or a batch that is not the
                ``ahead`` given ``staleness`` steps earlier.
        """
        cfg = self.config
        _check_batch(x, y, cfg.targeted)
        if ahead is not None:
            if cfg.staleness == 0:
                raise ValueError("ahead must be None when staleness=0 (sequential adversarial training)")
            if not isinstance(ahead, (tuple, list)) or len(ahead) != 2:
                raise ValueError(f"ahead must be None or a batch (x, y), got {type(ahead).__name__}")
            _check_batch(ahead[0], ahead[1], cfg.targeted)
        self._check_input_range(x)

        t = self.step
        slot = t % cfg.staleness if cfg.staleness else 0
        x_adv = self._take_pending(t, x)
        if x_adv is None and cfg.staleness and t >= cfg.staleness:
            # Batch t was not known tau steps ago: attack it now from theta_{t-tau}.
            snapshot = self._snapshots[slot]
            if snapshot.step != t - cfg.staleness:
                raise RuntimeError(f"snapshot slot {slot} holds step {snapshot.step}, expected {t - cfg.staleness}")
            self._drain()
            x_adv = self._attack_on(snapshot, x, y)
        self._wait_slot(slot)
        self._snapshots[slot].refresh(self.model, t)
        if x_adv is None:
            # No stale weights yet (t < tau) or tau == 0: theta_t itself.
            self._drain()
            x_adv = self._attack_on(self._snapshots[slot], x, y)
        if ahead is not None:
            self._pending[t + cfg.staleness] = (ahead[0], slot, self._launch(self._snapshots[slot], *ahead))

        clean = self.loss_fn(self.model(x), y)
        with auxiliary_bn(self.model, cfg.dual_bn):
            adversarial = self.loss_fn(self.model(x_adv), y)
        self.step = t + 1
        self.last_adversarial = x_adv
        self.last_clean_loss = clean.detach()
        self.last_adversarial_loss = adversarial.detach()
        total = clean + cfg.adv_weight * adversarial
        return total / (1 + cfg.adv_weight) if cfg.average_losses else total

    def close(self) -> None:
        """Waits for launched attacks and stops the background thread (the helper stays usable)."""
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> "ConAdv":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: step, snapshots, generator states, launched attacks."""
        self._drain()
        return {
            "config": self.config.to_dict(),
            "seed": self.seed,
            "step": self.step,
            "snapshots": [
                {"step": s.step, "state": copy.deepcopy(s.module.state_dict())} for s in self._snapshots
            ],
            "generators": {str(device): gen.get_state() for device, gen in self._generators.items()},
            "pending": {t: (x, slot, job.result()) for t, (x, slot, job) in self._pending.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (the hyperparameters must be the same).

        Raises:
            ValueError: if the saved hyperparameters differ from this helper's.
        """
        saved = ConAdvConfig.from_dict({**state["config"], "input_range": _as_range(state["config"]["input_range"])})
        if saved != self.config:
            raise ValueError(f"state was saved with {saved}, this ConAdv has {self.config}")
        self._drain()
        self.seed = state["seed"]
        self.step = state["step"]
        for snapshot, saved_snapshot in zip(self._snapshots, state["snapshots"], strict=True):
            snapshot.module.load_state_dict(saved_snapshot["state"])
            snapshot.step = saved_snapshot["step"]
        self._generators = {}
        for device, gen_state in state["generators"].items():
            self._generator(torch.device(device)).set_state(gen_state)
        self._pending = {int(t): (x, slot, _DoneJob(x_adv)) for t, (x, slot, x_adv) in state["pending"].items()}

    # -- internals -----------------------------------------------------------------------------
    def _check_input_range(self, x: torch.Tensor) -> None:
        if self._checked_range or self.config.input_range is None:
            return
        low, high = self.config.input_range
        if bool((x < low).any()) or bool((x > high).any()):
            raise ValueError(
                f"input_range={self.config.input_range} does not contain the data (batch min "
                f"{float(x.min()):.4g}, max {float(x.max()):.4g}): pass input_range=None or the data's range"
            )
        self._checked_range = True

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return self._generators[device]

    def _attack_on(self, snapshot: _Snapshot, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with auxiliary_bn(snapshot.module, self.config.dual_bn):
            return _attack(snapshot.module, self.loss_fn, x, y, self.config, self._generator(x.device))

    def _launch(self, snapshot: _Snapshot, x: torch.Tensor, y: torch.Tensor):
        if not self.concurrent:
            return _DoneJob(self._attack_on(snapshot, x, y))
        if x.is_cuda and torch.cuda.is_available():
            if x.device not in self._streams:
                self._streams[x.device] = torch.cuda.Stream(device=x.device)
            return _StreamJob(self._streams[x.device], self._attack_on, snapshot, x, y)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="conadv")
        return self._executor.submit(self._attack_on, snapshot, x, y)

    def _take_pending(self, t: int, x: torch.Tensor) -> torch.Tensor | None:
        for stale in [s for s in self._pending if s < t]:  # launched for batches that never came
            self._pending.pop(stale)[2].result()
        entry = self._pending.pop(t, None)
        if entry is None:
            return None
        expected_x, _, job = entry
        x_adv = job.result()
        if expected_x is not x and (expected_x.shape != x.shape or not torch.equal(expected_x, x)):
            raise ValueError(
                f"the batch of step {t} is not the ahead batch given at step {t - self.config.staleness}: "
                "iterate with conadv.lookahead(loader) and pass its ahead batch unchanged"
            )
        return x_adv

    def _wait_slot(self, slot: int) -> None:
        for _, job_slot, job in self._pending.values():
            if job_slot == slot:
                job.result()

    def _drain(self) -> None:
        for _, _, job in self._pending.values():
            job.result()


def _as_range(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))
