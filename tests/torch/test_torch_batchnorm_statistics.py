"""average_batchnorm_statistics on one process: two simulated ranks exchange their BatchNorm buffers.

A stand-in for ``horovod.torch`` averages the process's vector with the other
simulated rank's, so the test sees which buffers are gathered, in what order,
and how the mean is written back. The real two-rank run is checked in
tests/parallel/test_torch_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from hvd_largebatch.torch_impl import average_batchnorm_statistics
from hvd_largebatch.torch_impl import batchnorm_statistics


class _TwoRanks:
    """``hvd`` with two ranks: ``allreduce`` averages with ``other`` (or, with None, records the vector)."""

    Average = "average"

    def __init__(self, other: torch.Tensor | None, size: int = 2) -> None:
        self.other, self.sent, self._size = other, None, size

    def size(self) -> int:
        return self._size

    def allreduce(self, tensor: torch.Tensor, op: str, name: str) -> torch.Tensor:
        assert op == self.Average and name == "hvd_largebatch.batchnorm_statistics"
        self.sent = tensor.clone()
        return tensor if self.other is None else (tensor + self.other) / 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
        torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5, track_running_stats=False), torch.nn.Linear(5, 2),
    )


def _train(model: torch.nn.Module, seed: int, batches: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(batches):
        model(torch.randn(8, 3, generator=generator) * (1 + seed))


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _run(monkeypatch, model, other):
    fake = _TwoRanks(other)
    monkeypatch.setattr(batchnorm_statistics, "_horovod", lambda: fake)
    return average_batchnorm_statistics(model), fake.sent


def test_two_ranks_end_with_the_mean_of_their_statistics(monkeypatch):
    first, second = _model(), _model()
    _train(first, seed=1, batches=2)
    _train(second, seed=2, batches=4)
    before = [_buffers(first), _buffers(second)]
    assert before[0]["1.running_mean"].ne(before[1]["1.running_mean"]).all()
    weights = {k: v.clone() for k, v in first.named_parameters()}
    _, first_sent = _run(monkeypatch, first, None)  # only records what each rank sends
    _, second_sent = _run(monkeypatch, second, None)
    assert _buffers(first).keys() == before[0].keys() and all(torch.equal(_buffers(first)[k], v) for k, v in before[0].items())
    layers, _ = _run(monkeypatch, first, second_sent)
    _run(monkeypatch, second, first_sent)
    assert layers == 1  # the layer without running statistics has nothing to average
    after = [_buffers(first), _buffers(second)]
    assert sorted(after[0]) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    for key in ("1.running_mean", "1.running_var"):
        assert torch.equal(after[0][key], after[1][key])
        assert after[0][key].dtype == torch.float32
        expected = ((before[0][key].double() + before[1][key].double()) / 2).float()
        assert torch.equal(after[0][key], expected), (after[0][key], expected)
    assert after[0]["1.num_batches_tracked"].item() == after[1]["1.num_batches_tracked"].item() == 3  # (2 + 4) / 2
    assert after[0]["1.num_batches_tracked"].dtype == torch.long
    for name, value in first.named_parameters():  # only buffers change
        assert torch.equal(value, weights[name])


def test_one_rank_or_no_batchnorm_leaves_the_model_untouched(monkeypatch):
    model = _model()
    _train(model, seed=1, batches=2)
    before = _buffers(model)
    fake = _TwoRanks(None, size=1)
    monkeypatch.setattr(batchnorm_statistics, "_horovod", lambda: fake)
    assert average_batchnorm_statistics(model) == 1
    assert fake.sent is None and all(torch.equal(_buffers(model)[k], v) for k, v in before.items())
    fake = _TwoRanks(None, size=2)
    monkeypatch.setattr(batchnorm_statistics, "_horovod", lambda: fake)
    assert average_batchnorm_statistics(torch.nn.Linear(2, 2)) == 0
    assert fake.sent is None


def test_model_must_be_a_module():
    with pytest.raises(ValueError) as error:
        average_batchnorm_statistics([torch.nn.BatchNorm1d(2)])
    assert str(error.value) == "model must be a torch.nn.Module, got list"
