"""Per-example gradient norms from activations and output gradients ("ghost norms"), without per-example gradients.

For a layer whose output is linear in its parameters, the gradient of example
``i``'s loss with respect to the parameters is a product of that example's
input activations and the gradient at that example's output, so its norm can
be computed from those two tensors, which an ordinary forward and an
activation-only backward pass already produce:

* ``Linear`` (input ``a_i`` of shape ``(T, d_in)``, output gradient ``g_i`` of
  shape ``(T, d_out)``; ``T = 1`` for a plain batch):
  ``G_i = g_i^T a_i`` and ``||G_i||^2 = sum_{t,s} (a_i a_i^T)_{ts} (g_i g_i^T)_{ts}``
  (``= ||a_i||^2 ||g_i||^2`` when ``T = 1``); the bias gradient is ``sum_t g_i[t]``.
* ``Conv1d``/``Conv2d``: the same identity on the unfolded input
  (``a_i`` = the ``(C_in/groups * prod(kernel), L)`` patches of example ``i``,
  ``L`` output positions), per group; the bias gradient sums ``g_i`` over positions.
* ``BatchNorm`` (affine): ``grad gamma_i = sum_positions g_i * xhat_i``,
  ``grad beta_i = sum_positions g_i``, per channel, with ``xhat`` normalised
  by the statistics the layer used.

For each layer one of two exact evaluations is used: the Gram form
above (cost ``~ T^2 (d_in + d_out)`` per example) when it needs at most a
third of the multiply-adds of the per-example product ``g_i^T a_i`` for that
one layer, formed and reduced at once (cost ``~ T d_in d_out``), else the product; examples are processed in slices so that neither holds
more than about ``_SLICE_ELEMENTS`` numbers.

BatchNorm in training mode couples the examples through the batch statistics.
The package's per-example gradient (see :mod:`.per_example_norms`) holds those
statistics at the batch's values as constants. Inside :class:`GhostRecorder`
every training-mode BatchNorm layer runs torch's own batch-norm kernel (same
output, same running-statistics update) inside an autograd function with a
switch: in the training backward it returns the ordinary BatchNorm gradient
(torch's own backward kernel), in the per-example backward the gradient with
the statistics held constant, ``grad_x = grad_y * gamma / sigma``.

The per-example backward computes each layer's norms in a hook on the
autograd node that made the layer's output as soon as autograd reaches it,
so the output gradients are never held together; that node is noted when the
layer runs, so an in-place operation downstream (``ReLU(inplace=True)``)
does not change which gradient it sees.

Layers without a rule, layers called more than once per forward pass, layers
whose output needs no gradient and parameters shared between layers are
reported by :meth:`GhostRecorder.unsupported`; the caller measures those with
the ``vmap`` reference path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["GhostRecorder", "conv_norm_form", "has_ghost_rule"]

#: Upper bound on the numbers one slice of examples may hold in an intermediate of a rule.
_SLICE_ELEMENTS = 1 << 23

#: The same bound for the per-example kernels of one weight-gradient convolution (2-D products).
#: Smaller, because what such a call allocates (the kernels and oneDNN's reordered copies) is
#: freed at its end, and a few MB freed at once go back to the operating system, to be mapped
#: and zeroed again by the next call: on the ResNet-style benchmark a 32->32 3x3 layer's 64
#: examples in one call (2.4 MB of kernels) cost 7-10 ms and ~1,100-1,700 page faults per call,
#: in two calls of 32 examples 2.7 ms and none (one thread, same process).
_KERNEL_SLICE_ELEMENTS = 1 << 18

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def has_ghost_rule(module: nn.Module) -> bool:
    """Whether the parameters of ``module`` (itself, not its children) have a ghost-norm rule."""
    if type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d):
        return True
    return _is_plain_batch_norm(module) and module.affine


def _is_plain_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm layer whose forward is torch's own (so the recorder may re-express it)."""
    return isinstance(module, _NORM_TYPES) and type(module).forward is nn.modules.batchnorm._BatchNorm.forward


class _Switch:
    """Whether the gradient through BatchNorm's batch statistics flows (training backward) or not (per-example)."""

    def __init__(self) -> None:
        self.coupled = True


class _SwitchedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm whose backward drops the path through the batch statistics unless ``switch.coupled``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, switch, saved):  # noqa: D401
        out, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.switch = eps, switch
        saved.extend((mean, invstd))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        none = (None,) * 6
        if ctx.switch.coupled:
            mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad, x, weight, None, None, mean, invstd, True, ctx.eps, mask
            )
            return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, *none)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight
        return (grad * scale.view(shape), None, None, *none)


def _uses_batch_statistics(module: nn.Module) -> bool:
    return module.training or module.running_mean is None


class GhostRecorder:
    """Records the activations of rule layers in a forward pass and turns output gradients into per-example norms.

    Use::

        with GhostRecorder(model, params) as recorder:
            outputs = model(inputs)          # any forward: hooks record
        objective = sum of the per-example losses
        squared = recorder.squared_norms(objective)   # {id(param): (B,) per-example squared norms}

    Args:
        model: the module.
        params: the parameters to measure; those of ``unsupported()`` are not.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]) -> None:
        self.model = model
        wanted = {id(p) for p in params}
        # one pass over the modules, reading their own parameters directly (the per-step cost of
        # ``parameters(recurse=False)`` per module was ~0.3 ms on the ResNet-style benchmark)
        owners: dict[int, list[nn.Module]] = {}
        self._gated: list[nn.Module] = []  # BatchNorm layers re-expressed with the switch (measured or not)
        self._opaque_norms: list[nn.Module] = []  # forward not torch's own: its coupling cannot be cut
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None:
                    holders = owners.setdefault(id(p), [])
                    if not holders or holders[-1] is not module:
                        holders.append(module)
            if isinstance(module, _NORM_TYPES):
                (self._gated if _is_plain_batch_norm(module) else self._opaque_norms).append(module)
        self._modules: list[nn.Module] = []
        self._unsupported: set[int] = set()
        for p in params:
            holders = owners.get(id(p), [])
            if len(holders) != 1 or not has_ghost_rule(holders[0]):
                self._unsupported.add(id(p))
            elif holders[0] not in self._modules:
                self._modules.append(holders[0])
        self._wanted = wanted
        self._params = list(params)
        self.switch = _Switch()
        # module -> [(activation, gradient edge of the output)] per call
        self._records: dict[nn.Module, list[tuple]] = {}
        self._handles: list = []
        self._batch = 0
        self._coupled_by_opaque_norm = False

    # ------------------------------------------------------------- recording
    def __enter__(self) -> GhostRecorder:
        self._records = {}
        self._coupled_by_opaque_norm = False
        measured = set(map(id, self._modules))
        for module in self._modules:
            if not isinstance(module, _NORM_TYPES):
                self._handles.append(module.register_forward_hook(self._record_layer))
        for module in self._gated:
            module.forward = self._switched_forward(module, id(module) in measured)
        for module in self._opaque_norms:
            self._handles.append(module.register_forward_pre_hook(self._note_opaque_norm))
        return self

    def _note_opaque_norm(self, module: nn.Module, args: tuple) -> None:
        if _uses_batch_statistics(module):
            self._coupled_by_opaque_norm = True

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._gated:
            module.__dict__.pop("forward", None)

    def _record_layer(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._record(module, args[0].detach(), output)

    def _record(self, module: nn.Module, activation, output: torch.Tensor) -> None:
        """Keeps the layer's activation and its output's gradient edge.

        The edge (the autograd node that made the output, and which of its
        outputs it is) is taken now, before anything downstream (an in-place
        ReLU) may modify the output in place, so it stands for the output as
        the layer produced it.
        """
        self._batch = output.shape[0]
        edge = get_gradient_edge(output) if output.requires_grad else None  # None: the reference path measures it
        self._records.setdefault(module, []).append((activation, edge))

    def _measure(self, module: nn.Module, grad: torch.Tensor | None, result: dict[int, torch.Tensor]) -> None:
        """Turns a measured layer's output gradient into the squared norms of its parameters, into ``result``."""
        if grad is None:  # no gradient reaches the layer: norms 0 (filled in by the caller)
            return
        activation = self._records[module][0][0]
        if isinstance(module, nn.Linear):
            weight, bias = _linear_squared_norms(activation, grad)
        elif isinstance(module, _CONV_TYPES):
            weight, bias = _conv_squared_norms(module, activation, grad)
        else:
            weight, bias = _norm_squared_norms(module, *activation, grad)
        for p, value in ((module.weight, weight), (module.bias, bias)):
            if p is not None and id(p) in self._wanted and id(p) not in self._unsupported:
                result[id(p)] = value

    def _node_hook(self, module: nn.Module, output_nr: int, result: dict[int, torch.Tensor]):
        def measure(grad_outputs: tuple) -> None:
            self._measure(module, grad_outputs[output_nr], result)

        return measure

    def _switched_forward(self, module: nn.Module, measured: bool):
        """``module.forward`` for the recording pass: torch's BatchNorm forward, switched (module docstring)."""
        plain_forward = type(module).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not _uses_batch_statistics(module):
                out = plain_forward(module, x)
                if measured:
                    self._record(module, (x.detach(), None, None), out)
                return out
            module._check_input_dim(x)
            factor = 0.0 if module.momentum is None else module.momentum
            tracked = module.training and module.track_running_stats
            if tracked and module.num_batches_tracked is not None:
                module.num_batches_tracked.add_(1)
                factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
            saved: list[torch.Tensor] = []
            out = _SwitchedBatchNorm.apply(
                x, module.weight, module.bias,
                module.running_mean if tracked else None, module.running_var if tracked else None,
                factor, module.eps, self.switch, saved,
            )
            if measured:
                self._record(module, (x.detach(), *saved), out)
            return out

        return forward

    # ----------------------------------------------------------------- norms
    def unsupported(self) -> list[torch.Tensor]:
        """The parameters the recorder cannot measure: no rule, shared, their layer ran other than once or without gradient.

        All of them when a BatchNorm layer with a forward other than torch's
        own ran on batch statistics (its coupling of the examples cannot be cut).
        """
        if self._coupled_by_opaque_norm:
            return list(self._params)
        measured = set(self._measured_modules())
        called_badly = {id(p) for module in self._modules if module not in measured for p in module.parameters(recurse=False)}
        return [p for p in self._params if id(p) in self._unsupported or id(p) in called_badly]

    def _measured_modules(self) -> list[nn.Module]:
        if self._coupled_by_opaque_norm:
            return []
        return [m for m in self._modules if len(self._records.get(m, [])) == 1 and self._records[m][0][1] is not None]

    def squared_norms(self, objective: torch.Tensor, retain_graph: bool = False) -> dict[int, torch.Tensor]:
        """``{id(param): (B,) squared per-example gradient norms}``: one backward of ``objective``, statistics constant.

        Autograd is asked only for the gradients at the outputs that no other
        measured output lies upstream of (:func:`_first_outputs`); it passes
        all the others on its way there, and a hook on the node that made each
        of them turns the gradient the node receives into that layer's norms
        before the node runs. So no set of output gradients is ever held at
        once (holding them cost the ResNet-style benchmark some 8,000 freshly
        mapped pages, 30 MB, per step), and nothing runs in the training
        backward. A layer whose output gets no gradient from ``objective``
        has norms 0.
        """
        modules = self._measured_modules()
        result: dict[int, torch.Tensor] = {}
        if modules:
            edges = [self._records[m][0][1] for m in modules]
            first = _first_outputs(edges)
            first_nodes = {edge.node for edge in first}
            handles = [
                edge.node.register_prehook(self._node_hook(m, edge.output_nr, result))
                for m, edge in zip(modules, edges) if edge.node not in first_nodes
            ]
            self.switch.coupled = False
            try:
                grads = torch.autograd.grad(objective, first, retain_graph=retain_graph, allow_unused=True)
            finally:
                self.switch.coupled = True
                for handle in handles:
                    handle.remove()
            by_edge = {(edge.node, edge.output_nr): grad for edge, grad in zip(first, grads)}
            for module, edge in zip(modules, edges):
                if edge.node in first_nodes:
                    self._measure(module, by_edge[(edge.node, edge.output_nr)], result)
        for module in modules:
            for p in (module.weight, module.bias):
                if p is not None and id(p) in self._wanted and id(p) not in self._unsupported:
                    result.setdefault(id(p), p.new_zeros(self._batch))
        return result


def _first_outputs(edges: Sequence[GradientEdge]) -> list[GradientEdge]:
    """The gradient edges of ``edges`` that no other edge of ``edges`` lies upstream of in the autograd graph.

    A backward pass that asks only for these computes the gradient at every
    other edge on its way (each has one of them upstream). One depth-first
    walk over the graph above the edges, each node's inputs read once.
    """
    targets = {edge.node for edge in edges}
    inputs: dict[object, list] = {}  # node -> the nodes it passes gradients to
    reaches: dict[object, bool] = {}  # node -> whether it or a node upstream of it is a target
    stack = list(targets)
    while stack:
        node = stack[-1]
        if node in reaches:
            stack.pop()
            continue
        upstream = inputs.get(node)
        if upstream is None:
            upstream = inputs[node] = [n for n, _ in node.next_functions if n is not None]
            pending = [n for n in upstream if n not in reaches]
            if pending:
                stack.extend(pending)
                continue
        stack.pop()
        reaches[node] = node in targets or any(reaches[n] for n in upstream)
    return [edge for edge in edges if not any(reaches[n] for n in inputs[edge.node])]


def _over_slices(batch: int, per_example: int, rule, budget: int | None = None) -> torch.Tensor:
    """``rule(part)`` over equal slices of examples of at most ``budget / per_example`` each, concatenated.

    ``budget`` defaults to ``_SLICE_ELEMENTS``.
    """
    step = max(1, (_SLICE_ELEMENTS if budget is None else budget) // max(1, per_example))
    if step >= batch:
        return rule(slice(None))
    count = -(-batch // step)
    bounds = [batch * i // count for i in range(count + 1)]
    return torch.cat([rule(slice(start, end)) for start, end in zip(bounds, bounds[1:])])


#: How many times fewer multiply-adds the Gram form must need to be taken: its ``B`` small
#: ``(T, T)`` products run at a fraction of the speed of the product form's bigger ones (CPU,
#: measured: at 2.4x fewer, ``T = 10``, the product form is 1.4x faster; at 3.6x and more, the Gram form is).
_GRAM_ADVANTAGE = 3


def _gram_is_cheaper(positions: int, rows: int, columns: int) -> bool:
    """Whether ``||g^T a||_F^2`` for ``a: (positions, rows)``, ``g: (positions, columns)`` is cheaper by Gram matrices."""
    return _GRAM_ADVANTAGE * positions * (rows + columns) <= rows * columns


def _gram_or_product(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||g_n a_n||_F^2`` for every ``n``, for ``a: (N, T, p)`` and ``g: (N, q, T)``, the cheaper exact way."""
    n, t, p = a.shape
    q = g.shape[1]
    if t == 1:
        return a.square().sum((1, 2)) * g.square().sum((1, 2))
    if _gram_is_cheaper(t, p, q):
        def gram(part: slice) -> torch.Tensor:
            gram_a = torch.bmm(a[part], a[part].transpose(1, 2))
            return (gram_a * torch.bmm(g[part].transpose(1, 2), g[part])).sum((1, 2))

        return _over_slices(n, t * t, gram)

    def product(part: slice) -> torch.Tensor:
        # short side first: the batched product is faster so (bench conv 1->16 k5: 0.06 vs 0.095 ms)
        if p < q:
            per_example = torch.bmm(a[part].transpose(1, 2), g[part].transpose(1, 2))
        else:
            per_example = torch.bmm(g[part], a[part])
        return torch.linalg.vector_norm(per_example, dim=(1, 2)).square()

    return _over_slices(n, p * q, product)


def _linear_squared_norms(activation: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch = activation.shape[0]
    a = activation.reshape(batch, -1, activation.shape[-1])
    g = grad.reshape(batch, -1, grad.shape[-1])
    return _gram_or_product(a, g.transpose(1, 2)), g.sum(1).square().sum(1)


def _conv_input_and_padding(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input with any padding the layer pads itself applied, and the zero padding left for the convolution."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        # "same", "valid", or a non-zero padding mode: pad as the layer does, then convolve unpadded
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), (0,) * (x.dim() - 2)
    return x, tuple(module.padding)


def _conv_patches(module: nn.Module, x: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
    """``(B * groups, L, C_in/groups * prod(kernel))``: the input patch each output position of the convolution sees.

    Pointwise (a kernel of one tap, no zero padding), 1-D or 2-D: the input
    itself, strided, as a transposed view (a copy only when strided).
    1-D: the ``k`` taps of the kernel are ``k`` strided slices of the padded
    input, stacked into one ``(B, C_in, k, L)`` copy (cheaper than copying the
    overlapping windows of ``Tensor.unfold``), returned as a transposed view.
    """
    batch, groups = x.shape[0], module.groups
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if _is_pointwise(module, padding):
        taken = x[(slice(None), slice(None), *(slice(None, None, step) for step in stride))]
        return taken.reshape(batch * groups, x.shape[1] // groups, -1).transpose(1, 2)
    if x.dim() == 3:
        if padding[0]:
            x = F.pad(x, (padding[0], padding[0]))
        positions = (x.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        end = stride[0] * (positions - 1) + 1
        taps = [x[:, :, t * dilation[0]: t * dilation[0] + end: stride[0]] for t in range(kernel[0])]
        stacked = torch.stack(taps, 2)  # (B, C_in, k, L), channel-major rows as F.unfold's
        return stacked.reshape(batch * groups, -1, positions).transpose(1, 2)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C_in*K, L), channel-major
    return patches.reshape(batch * groups, -1, patches.shape[-1]).transpose(1, 2)


def _is_pointwise(module: nn.Module, padding: tuple[int, ...]) -> bool:
    """A convolution whose kernel has one tap and that pads with no zeros: its patches are its input, strided."""
    return math.prod(module.kernel_size) == 1 and not any(padding)


def conv_norm_form(module: nn.Module, positions: int) -> str:
    """How the per-example kernel norms of a convolution with ``positions`` output positions are evaluated.

    ``"gram"``: the Gram form on the input patches (cost per example and
    group ``~ L^2 (rows + C_out/groups)``); ``"product"``: the per-example
    kernel gradients themselves (``~ L * rows * C_out/groups``), formed and
    reduced at once; the Gram form when it needs at most a third of the
    product's multiply-adds (``_GRAM_ADVANTAGE``). ``rows`` is
    ``C_in/groups * prod(kernel)``.
    """
    rows = module.in_channels // module.groups * math.prod(module.kernel_size)
    return "gram" if _gram_is_cheaper(positions, rows, module.out_channels // module.groups) else "product"


def _conv_squared_norms(module: nn.Module, activation: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example squared norms of a convolution's kernel and bias, in the form :func:`conv_norm_form` picks.

    Gram form, pointwise kernels and 1-D products work on the input patches
    (one batched matrix product per slice of examples; a strided 1x1
    projection of the ResNet-style benchmark, 16->32 channels at 16x16, takes
    0.17 ms so against 0.54 ms as a grouped convolution). Other 2-D products are one
    weight-gradient convolution per slice of ``b`` examples with the
    examples as ``b * groups`` groups (torch's own convolution backward,
    which beats unfolding the patches there), squared and summed at once.
    """
    batch, groups = activation.shape[0], module.groups
    g = grad.reshape(batch, grad.shape[1], -1)  # (B, C_out, L)
    positions, out_rows = g.shape[-1], module.out_channels // groups
    rows = module.in_channels // groups * math.prod(module.kernel_size)
    x, padding = _conv_input_and_padding(module, activation)
    form = conv_norm_form(module, positions)
    bias = g.sum(2).square().sum(1)
    if form == "gram" or x.dim() == 3 or _is_pointwise(module, padding):
        def patch_rule(part: slice) -> torch.Tensor:
            a = _conv_patches(module, x[part], padding)
            b = a.shape[0] // groups
            return _gram_or_product(a, g[part].reshape(b * groups, out_rows, positions)).reshape(b, groups).sum(1)

        per_example = groups * (positions * positions + positions * rows if form == "gram" else positions * rows + rows * out_rows)
        return _over_slices(batch, per_example, patch_rule), bias

    def kernel_rule(part: slice) -> torch.Tensor:
        xs, gs = x[part], grad[part]
        b = xs.shape[0]
        per_example_kernels = torch.nn.grad.conv2d_weight(
            xs.reshape(1, b * module.in_channels, *xs.shape[2:]),
            (b * module.out_channels, module.in_channels // groups, *module.kernel_size),
            gs.reshape(1, b * module.out_channels, *gs.shape[2:]),
            module.stride, padding, module.dilation, b * groups,
        )
        return torch.linalg.vector_norm(per_example_kernels.reshape(b, -1), dim=1).square()

    return _over_slices(batch, module.weight.numel(), kernel_rule, _KERNEL_SLICE_ELEMENTS), bias


def _norm_squared_norms(module: nn.Module, x: torch.Tensor, mean: torch.Tensor | None, invstd: torch.Tensor | None,
                        grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example squared norms of BatchNorm's scale ``sum g * xhat`` and shift ``sum g`` (per channel).

    ``xhat`` is normalised by the statistics the layer used (the batch's,
    or the running ones); the centring is done in one temporary that then
    takes the product, and ``1/sigma`` is applied to the per-channel sums.
    """
    batch, channels = x.shape[0], x.shape[1]
    if mean is None:
        mean, invstd = module.running_mean, torch.rsqrt(module.running_var + module.eps)
    g = grad.reshape(batch, channels, -1)
    centred = x.reshape(batch, channels, -1) - mean.to(x.dtype)[:, None]
    scale = centred.mul_(g).sum(2) * invstd.to(x.dtype)
    return scale.square().sum(1), g.sum(2).square().sum(1)
