"""Ghost-norm per-example gradient norms equal the vmap reference in float64, alone and fused with the training pass."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hvd_largebatch.torch_impl import CLARS, loss_and_grad_norm_sums, per_example_grad_norm_sums, per_example_grad_norms
from hvd_largebatch.torch_impl.ghost_norms import GhostRecorder, conv_norm_form


class _TwiceUsed(nn.Module):
    """A Linear layer applied twice (its per-example gradient sums two products: no rule)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class _TwoBranches(nn.Module):
    """Two rule layers read the input side by side (two first outputs), a third is computed but unused (norms 0)."""

    def __init__(self):
        super().__init__()
        self.left = nn.Linear(5, 4)
        self.right = nn.Conv1d(1, 2, 3, padding=1)
        self.unused = nn.Linear(5, 2)
        self.head = nn.Linear(4 + 2 * 5, 3)

    def forward(self, x):
        self.unused(x)
        both = torch.cat([torch.tanh(self.left(x)), torch.relu(self.right(x.unsqueeze(1))).flatten(1)], 1)
        return self.head(both)


def _frozen_first_layer():
    """A first layer with frozen parameters: its output needs no gradient, so the reference path measures it."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].requires_grad_(False)
    return model


class _OwnBatchNorm(nn.BatchNorm1d):
    """A BatchNorm with its own forward: the recorder cannot cut its coupling, so everything falls back."""

    def forward(self, x):
        return super().forward(x) * 1.0


# (id, model builder, example shape); every builder is seeded and float64
MODELS = [
    ("linear-bias-bn", lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)), (5,)),
    ("linear-nobias", lambda: nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, bias=False)), (5,)),
    # sequence inputs: (2, 16) takes the Gram form, (3, 4) the per-example product
    ("linear-seq-gram", lambda: nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)), (2, 16)),
    ("linear-seq-product", lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)), (3, 4)),
    ("conv1d-bn", lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
        nn.Conv1d(4, 6, 3, groups=2, dilation=2, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Conv1d(6, 4, 3, padding="same", padding_mode="circular"), nn.Flatten(), nn.Linear(4 * 4, 3)), (2, 16)),
    ("conv1d-nobias-gram", lambda: nn.Sequential(
        nn.Conv1d(8, 16, 2, stride=2, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2, 3)), (8, 4)),
    ("conv2d-bn", lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, (3, 2), stride=2, padding="valid", bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding="same", padding_mode="reflect", dilation=(1, 2)), nn.Flatten(),
        nn.Linear(5 * 3 * 4, 3)), (2, 8, 9)),
    ("conv2d-nobias-groups", lambda: nn.Sequential(
        nn.Conv2d(4, 6, 3, groups=2, padding=2, padding_mode="replicate", bias=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 7 * 7, 3)), (4, 5, 5)),
    # 1-D Gram form with groups and padding, then a dilated grouped product
    ("conv1d-gram-groups-bn", lambda: nn.Sequential(
        nn.Conv1d(8, 24, 3, stride=3, padding=1, groups=2), nn.BatchNorm1d(24), nn.ReLU(),
        nn.Conv1d(24, 8, 2, stride=1, dilation=2, padding=1, groups=2), nn.Flatten(), nn.Linear(8 * 2, 3)), (8, 6)),
    # 2-D Gram form (small output, many rows), with bias and BatchNorm, grouped and not
    ("conv2d-gram-bn", lambda: nn.Sequential(
        nn.Conv2d(6, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 12, 2, groups=2, bias=False), nn.Flatten(), nn.Linear(12, 3)), (6, 4, 4)),
    # in-place ReLU after BatchNorm and convolution: the outputs are hooked before they are overwritten
    ("conv2d-bn-inplace-relu", lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2, bias=False), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 3 * 4, 3)), (2, 8, 9)),
    ("linear-bn-inplace-relu", lambda: nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(inplace=True), nn.Linear(7, 3)), (5,)),
    ("two-branches-and-an-unused-layer", _TwoBranches, (5,)),
    # pointwise kernels take the input itself as patches: strided and grouped, with and without bias, 1-D and 2-D
    ("conv2d-pointwise-bn", lambda: nn.Sequential(
        nn.Conv2d(4, 6, 1, stride=2, groups=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 1, padding="same"), nn.Flatten(), nn.Linear(5 * 3 * 3, 3)), (4, 5, 6)),
    ("conv1d-pointwise", lambda: nn.Sequential(
        nn.Conv1d(3, 4, 1, stride=3), nn.Tanh(), nn.Conv1d(4, 4, 1, groups=2, bias=False), nn.Flatten(),
        nn.Linear(4 * 3, 3)), (3, 7)),
    ("frozen-first-layer-falls-back", _frozen_first_layer, (5,)),
    ("bn-eval-and-no-running-stats", lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4).eval(), nn.ReLU(), nn.Conv1d(4, 4, 3),
        nn.BatchNorm1d(4, track_running_stats=False), nn.Flatten(), nn.Linear(4 * 4, 3)), (2, 8)),
    ("layernorm-falls-back", lambda: nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 3)), (5,)),
    ("twice-used-falls-back", _TwiceUsed, (6,)),
    ("own-batchnorm-falls-back", lambda: nn.Sequential(nn.Linear(5, 7), _OwnBatchNorm(7), nn.ReLU(), nn.Linear(7, 3)), (5,)),
]


def _model_and_batch(build, shape, batch=9):
    torch.manual_seed(0)
    model = build().double()
    torch.manual_seed(1)
    return model, torch.randn(batch, *shape, dtype=torch.float64), torch.randint(0, 3, (batch,))


@pytest.mark.parametrize("build,shape", [m[1:] for m in MODELS], ids=[m[0] for m in MODELS])
def test_ghost_norms_equal_the_vmap_reference_and_fused_training_pass_is_the_plain_one(build, shape):
    model, x, y = _model_and_batch(build, shape)
    params = list(model.parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    reference, count = per_example_grad_norm_sums(model, F.cross_entropy, x, y, params, method="vmap")
    ghost, ghost_count = per_example_grad_norm_sums(model, F.cross_entropy, x, y, params, method="auto")
    assert count == ghost_count == len(x)
    torch.testing.assert_close(ghost, reference, rtol=1e-10, atol=1e-12)
    for n, b in model.named_buffers():  # the measuring pass does not move running statistics
        assert torch.equal(b, buffers[n]), n

    plain = copy.deepcopy(model)
    plain_loss = F.cross_entropy(plain(x), y)
    plain_loss.backward()
    loss, fused, fused_count = loss_and_grad_norm_sums(model, F.cross_entropy, x, y, params)
    assert fused_count == len(x)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, plain_loss.detach(), rtol=1e-12, atol=0)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=name)
    for (name, b), c in zip(model.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=0, msg=name)
    assert all(isinstance(m, nn.Module) and "forward" not in m.__dict__ for m in model.modules())


# (id, loss_fn): cross_entropy itself takes the sum-reduction objective, the others the vmap one
LOSSES = [
    ("cross_entropy", F.cross_entropy),
    ("label-smoothing", lambda outputs, targets: F.cross_entropy(outputs, targets, label_smoothing=0.2)),
    ("class-weights", lambda outputs, targets: F.cross_entropy(
        outputs, targets, weight=torch.tensor([0.5, 1.0, 2.0], dtype=outputs.dtype))),
    ("quadratic", lambda outputs, targets: (outputs.square().sum(1) * (1 + targets)).mean()),
]


@pytest.mark.parametrize("loss_fn", [m[1] for m in LOSSES], ids=[m[0] for m in LOSSES])
def test_ghost_norms_equal_the_vmap_reference_for_every_loss(loss_fn):
    model, x, y = _model_and_batch(MODELS[4][1], MODELS[4][2])  # Conv1d with BatchNorm
    params = list(model.parameters())
    reference, _ = per_example_grad_norm_sums(model, loss_fn, x, y, params, method="vmap")
    ghost, _ = per_example_grad_norm_sums(model, loss_fn, x, y, params, method="auto")
    torch.testing.assert_close(ghost, reference, rtol=1e-10, atol=1e-12)
    _, fused, _ = loss_and_grad_norm_sums(model, loss_fn, x, y, params)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)


def test_the_sequence_models_cover_both_linear_forms():
    from hvd_largebatch.torch_impl.ghost_norms import _gram_is_cheaper

    assert _gram_is_cheaper(2, 16, 16) and not _gram_is_cheaper(3, 4, 6)


def test_the_models_cover_both_convolution_forms_in_one_and_two_dimensions():
    forms = set()
    for _, build, shape in MODELS:
        model, x, _ = _model_and_batch(build, shape)
        hooks = [
            m.register_forward_hook(lambda m, args, out: forms.add((out.dim() - 2, conv_norm_form(m, out[0, 0].numel()))))
            for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))
        ]
        model(x)
        for hook in hooks:
            hook.remove()
    assert forms == {(1, "gram"), (1, "product"), (2, "gram"), (2, "product")}


def test_the_recorder_measures_rule_layers_and_names_the_rest():
    model, x, _ = _model_and_batch(MODELS[-3][1], (5,))  # Linear, LayerNorm, ReLU, Linear
    with GhostRecorder(model, list(model.parameters())) as recorder:
        model(x)
    assert [id(p) for p in recorder.unsupported()] == [id(model[1].weight), id(model[1].bias)]
    model, x, _ = _model_and_batch(_TwiceUsed, (6,))
    with GhostRecorder(model, list(model.parameters())) as recorder:
        model(x)
    assert [id(p) for p in recorder.unsupported()] == [id(model.inner.weight), id(model.inner.bias)]


def test_clars_forward_backward_matches_clars_fed_vmap_norms_over_steps():
    build, shape = MODELS[4][1:]  # Conv1d with BatchNorm
    model, x, y = _model_and_batch(build, shape, batch=8)
    twin = copy.deepcopy(model)
    fast = CLARS(model.named_parameters(), lr=0.5, weight_decay=1e-3)
    slow = CLARS(twin.named_parameters(), lr=0.5, weight_decay=1e-3)
    for step in range(3):
        batch = torch.roll(x, step, 0), torch.roll(y, step, 0)
        fast.zero_grad()
        slow.zero_grad()
        fast.forward_backward(model, F.cross_entropy, *batch)
        F.cross_entropy(twin(batch[0]), batch[1]).backward()
        slow.set_grad_norms(per_example_grad_norms(twin, F.cross_entropy, *batch, method="vmap"))
        fast.step()
        slow.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=0, msg=name)


def test_bad_method_is_refused():
    model, x, y = _model_and_batch(MODELS[0][1], (5,))
    with pytest.raises(ValueError, match=r"method must be one of 'auto', 'vmap'; got 'ghost'"):
        per_example_grad_norm_sums(model, F.cross_entropy, x, y, list(model.parameters()), method="ghost")


def test_the_per_example_backward_asks_autograd_only_for_the_first_outputs():
    from hvd_largebatch.torch_impl.ghost_norms import _first_outputs

    model, x, y = _model_and_batch(_TwoBranches, (5,))
    with GhostRecorder(model, list(model.parameters())) as recorder:
        outputs = model(x)
    edges = {m: recorder._records[m][0][1] for m in recorder._measured_modules()}
    assert {e.node for e in _first_outputs(list(edges.values()))} == {
        edges[model.left].node, edges[model.right].node, edges[model.unused].node}
    squared = recorder.squared_norms(F.cross_entropy(outputs, y, reduction="sum"))
    assert torch.equal(squared[id(model.unused.weight)], torch.zeros(len(x), dtype=torch.float64))
    assert squared[id(model.head.weight)].gt(0).all()
    model, x, _ = _model_and_batch(_frozen_first_layer, (5,))
    with GhostRecorder(model, list(model.parameters())) as recorder:
        model(x)
    assert [id(p) for p in recorder.unsupported()] == [id(model[0].weight), id(model[0].bias)]


def test_the_models_cover_pointwise_kernels_in_one_and_two_dimensions():
    from hvd_largebatch.torch_impl.ghost_norms import _conv_input_and_padding, _is_pointwise

    dims = set()
    for _, build, shape in MODELS:
        model, x, _ = _model_and_batch(build, shape)
        hooks = [
            m.register_forward_hook(
                lambda m, args, out: dims.add(out.dim() - 2) if _is_pointwise(m, _conv_input_and_padding(m, args[0])[1]) else None)
            for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))
        ]
        model(x)
        for hook in hooks:
            hook.remove()
    assert dims == {1, 2}


@pytest.mark.parametrize("name", ["conv1d-bn", "conv2d-bn", "conv2d-gram-bn", "conv2d-pointwise-bn", "linear-seq-gram"])
def test_ghost_norms_in_slices_of_examples_equal_the_vmap_reference(name, monkeypatch):
    from hvd_largebatch.torch_impl import ghost_norms

    build, shape = next(m[1:] for m in MODELS if m[0] == name)
    model, x, y = _model_and_batch(build, shape, batch=11)
    params = list(model.parameters())
    reference, _ = per_example_grad_norm_sums(model, F.cross_entropy, x, y, params, method="vmap")
    monkeypatch.setattr(ghost_norms, "_SLICE_ELEMENTS", 1)  # one example per slice
    monkeypatch.setattr(ghost_norms, "_KERNEL_SLICE_ELEMENTS", 4 * 4 * 3 * 3 * 4)  # 2-D kernels: slices of 3 to 6 examples
    ghost, _ = per_example_grad_norm_sums(model, F.cross_entropy, x, y, params, method="auto")
    torch.testing.assert_close(ghost, reference, rtol=1e-10, atol=1e-12)
