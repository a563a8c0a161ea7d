"""``NoiseScaleMonitor``: the gradient noise scale (critical batch) measured while a PyTorch loop trains on Horovod.

It attaches to a Horovod ``DistributedOptimizer`` (this package's or a plain
``horovod.torch.DistributedOptimizer``) and needs no change to the loop:

* before the allreduce replaces a gradient, a hook records the squared norm
  of the rank's local gradient (``register_post_accumulate_grad_hook``,
  which PyTorch runs before Horovod's hook on the same gradient accumulator;
  with ``backward_passes_per_step`` passes, on the last pass, when the
  gradient holds the whole local sum);
* one allreduce of the local squared norm (a scalar; one entry per tensor
  with ``per_tensor=True``), started right after the last local gradient is
  recorded, together with the gradients' own allreduces, gives ``|G_s|^2``,
  the mean over ranks; after the optimizer synchronises, the averaged
  gradient gives ``|G_B|^2``;
* the core :class:`hvd_largebatch.noise_scale.NoiseScaleEstimator` turns the
  two into ``G2``, ``S`` and ``B_simple = EMA(S) / EMA(G2)``.

With one rank, Horovod does not allreduce at all; the micro-batches of
gradient accumulation (``backward_passes_per_step >= 2``) are the small
batches: a tensor hook takes the squared norm of each pass's incoming
gradient, counted when the post-accumulate hook confirms that it went into
``.grad`` (so ``torch.autograd.grad`` calls on the side are not counted).

Only every ``interval``-th step is measured; on the others the hooks return
at once. The monitor only reads gradients: training is bit-identical with and
without it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from hvd_largebatch import noise_scale as _core

__all__ = ["NoiseScaleMonitor"]


def _initialised_horovod() -> Any:
    hvd = sys.modules.get("horovod.torch")
    if hvd is None or not hvd.is_initialized():
        raise ValueError(_core.HOROVOD_NOT_INITIALISED.format(module="horovod.torch"))
    return hvd


def _sq_norm(tensor: torch.Tensor) -> torch.Tensor:
    """``|tensor|^2`` as a float64 scalar tensor on the tensor's device (norm in the tensor's precision, >= float32)."""
    dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.vector_norm(tensor, dtype=dtype).to(torch.float64).square()


class NoiseScaleMonitor(_core.MonitorReadings):
    """Measures the gradient noise scale ``B_simple`` of a loop that trains with a Horovod ``DistributedOptimizer``.

    McCandlish et al. 2018 (appendix A): ``|G_s|^2`` is the mean over the
    ``k`` ranks of each local squared gradient norm (small batch
    ``b_s = batch_size * backward_passes_per_step``), ``|G_B|^2`` the squared
    norm of the averaged gradient (``b_B = k * b_s``); with one rank the
    passes' gradients are the small batches (``b_s = batch_size``,
    ``b_B = backward_passes_per_step * batch_size``). Then::

        G2 = (b_B*|G_B|^2 - b_s*|G_s|^2) / (b_B - b_s)
        S  = (|G_s|^2 - |G_B|^2) / (1/b_s - 1/b_B)
        B_simple = EMA(S) / EMA(G2)

    Horovod sums the passes of gradient accumulation; both squared norms are
    divided by ``backward_passes_per_step**2``, so ``G2`` and ``S`` are in
    the units of the gradient of one pass's loss (the Keras monitor reports
    the same). ``B_simple`` does not depend on how the loss is scaled (a
    loss scale, dividing the loss by the number of passes).

    Args:
        optimizer: a Horovod ``DistributedOptimizer`` (from
            :func:`hvd_largebatch.torch_impl.DistributedOptimizer` or
            ``horovod.torch.DistributedOptimizer``) with ``op`` Average or Sum.
        batch_size: examples per rank in one backward pass.
        interval: measure every ``interval``-th optimizer step (>= 1).
        ema_decay: decay of the averages per measurement, in [0, 1).
        per_tensor: also keep ``G2``, ``S`` and ``B_simple`` per parameter
            (the allreduce then carries one value per tensor).

    Raises:
        ValueError: naming the argument: Horovod not initialised, an
            optimizer that is not a Horovod ``DistributedOptimizer`` or uses
            Adasum, ``interval`` < 1, ``ema_decay`` outside [0, 1), one rank
            with ``backward_passes_per_step`` < 2.

    Example:
        >>> import horovod.torch as hvd  # doctest: +SKIP
        >>> from hvd_largebatch.torch_impl import LARS, DistributedOptimizer, NoiseScaleMonitor  # doctest: +SKIP
        >>> opt = DistributedOptimizer(LARS(model.named_parameters(), lr=0.1))  # doctest: +SKIP
        >>> monitor = NoiseScaleMonitor(opt, batch_size=64)  # doctest: +SKIP
        >>> # ... the usual loop: loss.backward(); opt.step() ...
        >>> print(monitor.advice())  # doctest: +SKIP
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        interval: int = _core.DEFAULT_INTERVAL,
        ema_decay: float = _core.DEFAULT_EMA_DECAY,
        per_tensor: bool = False,
    ):
        hvd = _initialised_horovod()
        self.interval = _core.check_interval(interval)
        ema_decay = _core.check_ema_decay(ema_decay)
        if not isinstance(per_tensor, bool):
            raise ValueError(f"per_tensor must be True or False, got {per_tensor!r}")
        if not (callable(getattr(optimizer, "synchronize", None)) and hasattr(optimizer, "backward_passes_per_step")):
            raise ValueError(_core.NOT_DISTRIBUTED.format(optimizer=type(optimizer).__name__))
        op = getattr(optimizer, "op", hvd.Adasum)
        if op not in (hvd.Average, hvd.Sum):
            raise ValueError(_core.UNSUPPORTED_OP.format(op=op))
        process_set = getattr(optimizer, "process_set", None)
        self.world_size = int(process_set.size() if process_set is not None else hvd.size())
        self.passes = int(optimizer.backward_passes_per_step)
        self.batch_size = _core.check_batch_size(batch_size)
        small, big = _core.batch_sizes(self.batch_size, self.world_size, self.passes)
        self._hvd, self._process_set, self._sum_op = hvd, process_set, op == hvd.Sum
        self.optimizer = optimizer
        self.per_tensor = per_tensor
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        names = getattr(optimizer, "_parameter_names", {})
        self.tensor_names = [names.get(p, str(i)) for i, p in enumerate(self._params)]
        self.estimator = _core.NoiseScaleEstimator(
            small, big, ema_decay, tensor_names=self.tensor_names if per_tensor else None
        )
        #: Optimizer steps (synchronisations) seen so far.
        self.steps = 0
        #: This rank's ``|G_s|^2`` entries of the last measurement (before the allreduce), float64.
        self.last_local_sq_norms: list[float] = []
        #: ``|G_s|^2`` and ``|G_B|^2`` entries of the last measurement, as fed to the estimator.
        self.last_small_sq_norms: list[float] = []
        self.last_big_sq_norms: list[float] = []
        self._measuring = True
        self._local_sq: list[torch.Tensor | None] = [None] * len(self._params)
        self._pending: list[torch.Tensor | None] = [None] * len(self._params)
        self._passes_seen = [0] * len(self._params)
        self._recorded = 0
        self._local_allreduce: tuple[torch.Tensor, Any] | None = None
        self._handles = []
        for index, p in enumerate(self._params):
            if self.world_size > 1:
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_accumulated_hook(index)))
            else:  # the incoming gradient of a pass, counted once it is accumulated into .grad
                self._handles.append(p.register_hook(self._make_pass_hook(index)))
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_pass_accumulated_hook(index)))
        self._original_synchronize = optimizer.synchronize
        optimizer.synchronize = self._synchronize

    # ------------------------------------------------------------------ hooks
    def _make_accumulated_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            if not self._measuring:
                return
            self._passes_seen[index] += 1
            if self._passes_seen[index] == self.passes:  # Horovod starts this gradient's allreduce right after
                self._local_sq[index] = _sq_norm(param.grad.detach())
                self._recorded += 1
                if self._recorded == len(self._params):  # the last local gradient: send the norms with it
                    self._start_local_allreduce()

        return hook

    def _make_pass_hook(self, index: int):
        # Tensor hooks also fire for torch.autograd.grad (which leaves .grad alone): the value waits
        # here until the post-accumulate hook confirms that it went into .grad.
        def hook(grad: torch.Tensor) -> None:
            if self._measuring:
                self._pending[index] = _sq_norm(grad.detach())

        return hook

    def _make_pass_accumulated_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            value = self._pending[index]
            if not self._measuring or value is None:
                return
            self._pending[index] = None
            previous = self._local_sq[index]
            self._local_sq[index] = value if previous is None else previous + value

        return hook

    # ------------------------------------------------------------ measurement
    def _synchronize(self) -> None:
        if not self._measuring:
            self._original_synchronize()
            self._advance()
            return
        if self._local_allreduce is None:
            self._start_local_allreduce()
        local_sq, handle = self._local_allreduce
        scale = 1.0 / self.passes**2
        device = self._params[0].device
        self._original_synchronize()
        zero = torch.zeros((), dtype=torch.float64, device=device)
        big = torch.stack([zero if p.grad is None else _sq_norm(p.grad.detach()).to(device) for p in self._params])
        big = big * (scale / self.world_size**2 if self._sum_op else scale)
        if not self.per_tensor:
            big = big.sum().reshape(1)
        small = local_sq if handle is None else self._hvd.synchronize(handle)
        self.last_local_sq_norms = local_sq.cpu().tolist()
        self.last_small_sq_norms = small.cpu().tolist()
        self.last_big_sq_norms = big.cpu().tolist()
        self.estimator.update(self.last_small_sq_norms, self.last_big_sq_norms, step=self.steps)
        self._advance()

    def _start_local_allreduce(self) -> None:
        """This rank's ``|G_s|^2`` entries, and (``k > 1``) the start of their allreduce (average over ranks)."""
        device = self._params[0].device
        local = []
        for index, p in enumerate(self._params):
            value = self._local_sq[index]
            if value is None:  # no hook this step: Horovod has not sent this gradient yet, it is still local
                value = torch.zeros((), dtype=torch.float64) if p.grad is None else _sq_norm(p.grad.detach())
            local.append(value.to(device))
        # one rank: the mean over the passes of each pass's squared norm; k ranks: the local sum of the passes
        local_sq = torch.stack(local) / self.passes if self.world_size == 1 else torch.stack(local) / self.passes**2
        if not self.per_tensor:
            local_sq = local_sq.sum().reshape(1)
        handle = None
        if self.world_size > 1:
            kwargs = {} if self._process_set is None else {"process_set": self._process_set}
            handle = self._hvd.allreduce_async(
                local_sq, op=self._hvd.Average, name="hvd_largebatch.noise_scale.local_sq_norm", **kwargs
            )
        self._local_allreduce = (local_sq, handle)

    def _advance(self) -> None:
        self.steps += 1
        self._measuring = self.steps % self.interval == 0
        self._local_sq = [None] * len(self._params)
        self._pending = [None] * len(self._params)
        self._passes_seen = [0] * len(self._params)
        self._recorded = 0
        self._local_allreduce = None

    # ---------------------------------------------------------------- results
    # b_simple, g2, s, raw_g2, raw_s and advice() come from the core's MonitorReadings.
    @property
    def global_batch(self) -> int:
        """Examples behind one update: ``b_B``."""
        return self.estimator.big_batch

    def per_tensor_values(self) -> dict[str, dict[str, float]]:
        """``{parameter name: {"b_simple", "g2", "s"}}`` (needs ``per_tensor=True``)."""
        if not self.per_tensor:
            raise ValueError("per_tensor_values() needs NoiseScaleMonitor(..., per_tensor=True)")
        return self.estimator.per_tensor()

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state (JSON-able) for a checkpoint."""
        return {"steps": self.steps, "estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; measuring resumes at the same step phase."""
        self.estimator.load_state_dict(state["estimator"])
        self.steps = int(state["steps"]) - 1
        self._advance()

    def remove(self) -> None:
        """Detaches the hooks and restores the optimizer's own ``synchronize``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.optimizer.__dict__.get("synchronize") == self._synchronize:
            del self.optimizer.synchronize
