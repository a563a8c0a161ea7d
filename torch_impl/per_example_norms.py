"""Per-example gradient norms for CLARS: the ``exact`` (torch.func) and ``microbatch:k`` estimators.

CLARS (Huo, Gu, Huang, AAAI 2021) divides by ``s_l = (1/B) sum_i ||grad_l f_i(w)||``,
the mean over the global batch of the per-example gradient norms of tensor
``l``, instead of the norm of the averaged gradient. Each worker computes,
for its local examples, the *sums* of those norms and the number of terms;
the optimizer (or :func:`per_example_grad_norms`) averages them across
workers with one small allreduce of a vector holding one sum per tensor plus
the count.

Estimators (ALGORITHMS.md, "CLARS"; this reading of the paper is ours):

* ``"exact"``: the norms of the true per-example gradients. For the
  parameters of ``Linear``, ``Conv1d``, ``Conv2d`` and affine BatchNorm
  layers they come from activations and output gradients without forming
  per-example gradients (:mod:`.ghost_norms`): one forward and one
  activation-only backward pass over the batch. Every other parameter (a
  layer without a rule, a layer run twice, a shared tensor) is measured by
  the reference path, ``torch.func.vmap`` over ``torch.func.grad`` of the
  one-example loss, ``chunk_size`` examples at a time (about B vectorised
  single-example backward passes; peak extra memory about ``chunk_size`` x
  the size of those parameters). ``method="vmap"`` measures everything
  with the reference path. Both give the same numbers to rounding (tested
  in float64). The ghost path assumes that examples meet only in BatchNorm
  layers (true of ordinary networks; a layer that mixes examples otherwise
  is handled by neither path as a per-example computation).
  :func:`loss_and_grad_norm_sums` also takes the forward pass and
  activations from the training step itself. Measured by
  ``benchmarks/clars_step_time.py``.
* ``"microbatch:k"``: the local batch cut into ``k`` micro-batches (sizes
  differ by at most one) and ``s`` the mean of the micro-batch gradient
  norms: ``k`` ordinary forward/backward passes of ``B/k`` examples. With
  ``k`` equal to the batch size it is the exact estimator (tested).

BatchNorm: a BatchNorm layer in training mode couples the examples of a batch
through its statistics, so "the gradient of one example" is not defined by
the model alone (and ``vmap`` cannot update running statistics in place).
Both estimators therefore hold every training-mode BatchNorm layer at the
mean and (biased) variance of the whole local batch, the values the training
forward normalises with: a first no-grad forward pass over the batch (on
copies of the buffers, so the running statistics are not updated twice)
records them, and the per-example passes run those layers in evaluation mode
with the recorded statistics in place of the running ones (the ghost path
obtains the same by cutting the gradient through the statistics, see
:mod:`.ghost_norms`). The per-example gradient is then the gradient of example ``i``'s loss with the batch
statistics treated as constants; the model's modes and buffers are restored
afterwards. Dropout draws independent masks per example (``vmap`` with
``randomness="different"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.func import functional_call

from hvd_largebatch import config
from hvd_largebatch.torch_impl.ghost_norms import GhostRecorder

__all__ = [
    "per_example_grad_norm_sums",
    "per_example_grad_norms",
    "loss_and_grad_norm_sums",
    "batch_norm_frozen_at_batch_statistics",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _parameter_names(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for index, p in enumerate(params):
        if id(p) not in by_id:
            raise ValueError(f"params[{index}] (shape {tuple(p.shape)}) is not a parameter of model")
        names.append(by_id[id(p)])
    return names


@contextlib.contextmanager
def batch_norm_frozen_at_batch_statistics(model: torch.nn.Module, inputs: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Records the batch statistics of every training-mode BatchNorm layer and runs them in eval mode.

    Yields:
        Buffer overrides for ``torch.func.functional_call``: each such layer's
        ``running_mean``/``running_var`` replaced by the mean and biased
        variance of its input over ``inputs``. Inside the block those layers
        are in evaluation mode; on exit their modes are restored. The model's
        own buffers are never written.
    """
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training
    ]
    if not layers:
        yield {}
        return
    statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(name: str):
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            dims = [0, *range(2, x.dim())]
            statistics[name] = (x.mean(dims), x.var(dims, unbiased=False))

        return record

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in layers]
    try:
        buffer_copies = {name: b.clone() for name, b in model.named_buffers()}
        with torch.no_grad():
            functional_call(model, buffer_copies, (inputs,))
    finally:
        for handle in handles:
            handle.remove()
    overrides: dict[str, torch.Tensor] = {}
    for name, _ in layers:
        if name in statistics:
            prefix = f"{name}." if name else ""
            overrides[prefix + "running_mean"], overrides[prefix + "running_var"] = statistics[name]
    try:
        for _, module in layers:
            module.training = False
        yield overrides
    finally:
        for _, module in layers:
            module.training = True


def per_example_grad_norm_sums(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    estimator: str = "exact",
    chunk_size: int = 32,
    method: str = "auto",
) -> tuple[torch.Tensor, int]:
    """This worker's per-tensor sums of per-example (or per-micro-batch) gradient norms.

    Args:
        model: the module; ``model(inputs)`` gives the outputs.
        loss_fn: ``loss_fn(outputs, targets)``, the *mean* loss over the
            examples given (e.g. ``torch.nn.functional.cross_entropy``).
        inputs, targets: the local batch (examples on dimension 0).
        params: parameters of ``model`` to measure (CLARS: the adapted ones).
        estimator: ``"exact"`` or ``"microbatch:k"``.
        chunk_size: ``exact`` only: examples whose gradients the vmap path holds at once.
        method: ``exact`` only: ``"auto"`` (ghost-norm rules where a layer
            has one, the vmap path for the rest) or ``"vmap"`` (the reference
            path for every tensor).

    Returns:
        ``(sums, count)``: float64 sums over this worker's examples (or
        micro-batches) of ``||grad_l f_i||``, one per tensor of ``params``,
        and the number of terms; ``sums / count`` is the local ``s``.

    Raises:
        ValueError: naming ``estimator``, ``chunk_size``, ``method``,
            ``params``, ``inputs`` or ``targets``.
    """
    kind, microbatches = config.parse_estimator(estimator)
    chunk_size = config.check_positive_int("chunk_size", chunk_size)
    _check_method(method)
    params = list(params)
    if not params:
        raise ValueError("params must hold at least one parameter of model")
    names = _parameter_names(model, params)
    _check_batch(inputs, targets)
    batch = inputs.shape[0]
    if kind == "microbatch" and microbatches > batch:
        raise ValueError(f"estimator {estimator!r} needs k <= the local batch size {batch}")
    if kind == "exact" and method == "auto":
        with torch.enable_grad():
            norms = _ghost_or_reference_norms(model, loss_fn, inputs, targets, params, names, chunk_size, None)
        return norms.to(torch.float64).sum(0), batch
    detached = {name: p.detach() for name, p in zip(names, params)}
    selected = set(names)
    # the other parameters enter as constants, so no graph reaches the model's own tensors
    constants = {name: p.detach() for name, p in model.named_parameters() if name not in selected}
    with batch_norm_frozen_at_batch_statistics(model, inputs) as frozen, torch.enable_grad():
        overrides = {**constants, **frozen}
        if kind == "exact":
            per_example = _exact_norms(model, loss_fn, inputs, targets, detached, overrides, chunk_size)
            return per_example.detach().to(torch.float64).sum(0), batch
        sums = _microbatch_norm_sums(model, loss_fn, inputs, targets, detached, overrides, microbatches)
        return sums.detach(), microbatches


def _check_method(method: str) -> None:
    config.check_choice("method", method, config.EXACT_NORM_METHODS)


def _check_batch(inputs: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a tensor with a non-empty batch dimension, got {type(inputs).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
        raise ValueError("targets must be a tensor with the same batch size as inputs")


def _sum_of_example_losses(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum_i loss_fn(outputs[i:i+1], targets[i:i+1])``: the objective whose gradient at example i is f_i's.

    For ``torch.nn.functional.cross_entropy`` itself that is its
    ``reduction="sum"`` (no ``vmap``: about 0.4 ms less per call on the bench
    CNN's batch of 128 on CPU); an example whose target is the ignore index
    then contributes a zero gradient instead of the NaN of its one-example
    mean over no terms.
    """
    if loss_fn is torch.nn.functional.cross_entropy:
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="sum")
    one = lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0))  # noqa: E731
    return torch.func.vmap(one)(outputs, targets).sum()


def _reference_norms(model, loss_fn, inputs, targets, params, names, chunk_size) -> torch.Tensor:
    """``(B, len(params))`` per-example norms by the vmap reference path (BatchNorm at batch statistics)."""
    detached = {name: p.detach() for name, p in zip(names, params)}
    selected = set(names)
    constants = {name: p.detach() for name, p in model.named_parameters() if name not in selected}
    with batch_norm_frozen_at_batch_statistics(model, inputs) as frozen:
        return _exact_norms(model, loss_fn, inputs, targets, detached, {**constants, **frozen}, chunk_size).detach()


def _ghost_or_reference_norms(model, loss_fn, inputs, targets, params, names, chunk_size, training) -> torch.Tensor:
    """``(B, len(params))`` per-example norms: ghost rules where they apply, the vmap path for the rest.

    ``training`` is ``None`` for a separate measuring pass (on copies of the
    buffers, so running statistics are not updated), or ``(loss_holder,)``,
    a one-element list, to run the training forward on the model itself,
    back-propagate the training loss into ``.grad`` and leave it in
    ``loss_holder[0]``.
    """
    recorder = GhostRecorder(model, params)
    with recorder:
        if training is None:
            buffer_copies = {name: b.clone() for name, b in model.named_buffers()}
            outputs = functional_call(model, buffer_copies, (inputs,))
        else:
            outputs = model(inputs)
    if training is not None:  # the training backward first, so the per-example one may free the graph as it goes
        loss = loss_fn(outputs, targets)
        loss.backward(retain_graph=True)
        training[0] = loss.detach()
    squared = recorder.squared_norms(_sum_of_example_losses(loss_fn, outputs, targets))
    batch = inputs.shape[0]
    measured = [index for index, p in enumerate(params) if id(p) in squared]
    rest = [index for index, p in enumerate(params) if id(p) not in squared]
    ghost = None
    if measured:  # one clamp and one root for all measured tensors
        ghost = torch.stack([squared[id(params[i])].reshape(batch) for i in measured], 1).clamp_min_(0).sqrt_()
        if not rest:
            return ghost.to(params[0].dtype)
    columns: list[torch.Tensor | None] = [None] * len(params)
    for position, index in enumerate(measured):
        columns[index] = ghost[:, position]
    if rest:
        reference = _reference_norms(
            model, loss_fn, inputs, targets, [params[i] for i in rest], [names[i] for i in rest], chunk_size
        )
        for position, index in enumerate(rest):
            columns[index] = reference[:, position]
    return torch.stack([c.to(params[0].dtype).reshape(batch) for c in columns], 1)


def loss_and_grad_norm_sums(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    estimator: str = "exact",
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The training step's forward and backward pass, and this worker's per-example norm sums, together.

    Runs ``loss = loss_fn(model(inputs), targets)`` in the model's current
    mode, ``loss.backward()`` (gradients accumulate into ``.grad`` as
    usual, Horovod hooks fire as usual), and measures the per-example norms
    of ``params`` as :func:`per_example_grad_norm_sums` does. With
    ``estimator="exact"`` the ghost rules reuse the training forward's
    activations, so the extra cost is one activation-only backward pass
    (plus the vmap path for tensors without a rule); with
    ``"microbatch:k"`` it is the ``k`` micro-batch passes.

    Returns:
        ``(loss, sums, count)``: the detached training loss and the sums and
        count of :func:`per_example_grad_norm_sums`.

    Raises:
        ValueError: as :func:`per_example_grad_norm_sums`.
    """
    kind, _ = config.parse_estimator(estimator)
    chunk_size = config.check_positive_int("chunk_size", chunk_size)
    params = list(params)
    if not params:
        raise ValueError("params must hold at least one parameter of model")
    names = _parameter_names(model, params)
    _check_batch(inputs, targets)
    if kind != "exact":
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        sums, count = per_example_grad_norm_sums(
            model, loss_fn, inputs, targets, params, estimator=estimator, chunk_size=chunk_size
        )
        return loss.detach(), sums, count
    holder: list[torch.Tensor | None] = [None]
    with torch.enable_grad():
        norms = _ghost_or_reference_norms(model, loss_fn, inputs, targets, params, names, chunk_size, holder)
    return holder[0], norms.to(torch.float64).sum(0), inputs.shape[0]


def _exact_norms(model, loss_fn, inputs, targets, params, overrides, chunk_size) -> torch.Tensor:
    """``(B, L)`` per-example gradient norms via ``vmap(grad)``."""
    names = list(params)

    def one_example_norms(weights, x, y):
        def loss_of(w):
            outputs = functional_call(model, {**w, **overrides}, (x.unsqueeze(0),))
            return loss_fn(outputs, y.unsqueeze(0))

        grads = torch.func.grad(loss_of)(weights)
        return torch.stack([torch.linalg.vector_norm(grads[name]) for name in names])

    batched = torch.func.vmap(one_example_norms, in_dims=(None, 0, 0), randomness="different", chunk_size=chunk_size)
    return batched(params, inputs, targets)


def _microbatch_norm_sums(model, loss_fn, inputs, targets, params, overrides, microbatches) -> torch.Tensor:
    names = list(params)
    sums = torch.zeros(len(names), dtype=torch.float64, device=next(iter(params.values())).device)
    for index in torch.tensor_split(torch.arange(inputs.shape[0], device=inputs.device), microbatches):
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        outputs = functional_call(model, {**leaves, **overrides}, (inputs[index],))
        grads = torch.autograd.grad(loss_fn(outputs, targets[index]), list(leaves.values()), allow_unused=True)
        norms = [
            torch.linalg.vector_norm(g).to(torch.float64) if g is not None else sums.new_zeros(())
            for g in grads
        ]
        sums += torch.stack(norms).to(sums.device)
    return sums


def per_example_grad_norms(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: Sequence[torch.Tensor] | None = None,
    *,
    estimator: str = "exact",
    chunk_size: int = 32,
    average_across_workers: bool = True,
    method: str = "auto",
) -> dict[str, torch.Tensor]:
    """The CLARS ``s`` of each parameter: mean per-example gradient norm over the (global) batch.

    Args:
        model, loss_fn, inputs, targets, estimator, chunk_size, method: as
            :func:`per_example_grad_norm_sums`.
        params: the parameters to measure; default all of ``model``'s
            parameters that require a gradient.
        average_across_workers: when Horovod is initialised with more than
            one process, average over all workers' examples with one
            allreduce (every rank must call this function).

    Returns:
        ``{name: s}`` with 0-d float64 tensors, ready for ``CLARS.set_grad_norms``.

    Example:
        >>> import torch
        >>> from hvd_largebatch.torch_impl import per_example_grad_norms
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> s = per_example_grad_norms(model, torch.nn.functional.cross_entropy, x, y)
        >>> sorted(s)
        ['bias', 'weight']
    """
    from hvd_largebatch.torch_impl.distributed import allreduce_sum_across_workers

    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    names = _parameter_names(model, params)
    sums, count = per_example_grad_norm_sums(
        model, loss_fn, inputs, targets, params, estimator=estimator, chunk_size=chunk_size, method=method
    )
    totals = torch.cat([sums, sums.new_tensor([float(count)])])
    if average_across_workers:
        totals = allreduce_sum_across_workers(totals, name="hvd_largebatch.per_example_grad_norms")
    means = totals[:-1] / totals[-1]
    return dict(zip(names, means.unbind()))
