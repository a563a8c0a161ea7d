"""What a study run measures and when it stops, shared by the PyTorch and Keras runners.

A runner trains one :class:`~hvd_largebatch.bench.recipes.CellPlan` of the
study and feeds :class:`RunMonitor` the numbers every rank agrees on (they
come out of allreduces): after every step the mean training loss over the
ranks, whether the optimizer skipped a non-finite step and, when measured,
the two squared gradient norms of the noise scale; at the evaluation steps
the validation accuracy and loss. The monitor decides, identically on every
rank:

* **diverged**: the mean loss is not finite or above ``DIVERGENCE_LOSS``, or
  the optimizer skipped a step with non-finite gradients: the trial stops at
  once (a trial that blows up is not trained to the end of its budget);
* **target**: every target is reached and the run stops at targets
  (tuning and repeat runs);
* **budget**: the schedule's last step.

:meth:`RunMonitor.result` is the run's record for ``results.json``.

Framework-free (no torch or TensorFlow).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hvd_largebatch.bench.noise_estimate import NoiseScaleEMA
from hvd_largebatch.bench.recipes import CellPlan
from hvd_largebatch.bench.targets import evaluation_steps, steps_to_target

__all__ = ["DIVERGENCE_LOSS", "RunMonitor", "target_key", "summary_line"]

#: Ten times the cross-entropy of a uniform guess over MNIST-1D's ten classes.
DIVERGENCE_LOSS = 10.0 * math.log(10.0)


def target_key(target: float) -> str:
    """The JSON key of a target accuracy (``0.97`` -> ``"0.97"``)."""
    return f"{target:g}"


class RunMonitor:
    """The evaluation schedule, targets, divergence rule and measurements of one study run.

    Args:
        plan: a plan of the study (its ``study`` field must be set).

    Raises:
        ValueError: when ``plan.study`` is None.
    """

    def __init__(self, plan: CellPlan) -> None:
        if plan.study is None:
            raise ValueError(f"plan.study must describe a study run, got None for {plan.label}")
        study = plan.study
        self.total_steps = plan.total_steps
        min_gap = -(-int(study["validation_size"]) // plan.global_batch)  # as many examples trained as scored
        self.evaluation_steps = frozenset(
            evaluation_steps(self.total_steps, float(study["evaluation_ratio"]), min_gap=min_gap)
        )
        self.targets = [float(t) for t in study["targets"]]
        self.stop_at_target = bool(study["stop_at_target"])
        self.global_batch = plan.global_batch
        self.noise = (
            NoiseScaleEMA(plan.per_worker_batch, plan.global_batch) if plan.world_size > 1 else None
        )
        self.step = 0
        self.stopped: str | None = None
        self.trace: list[list[float]] = []
        self.noise_trace: list[list[float]] = []
        self._loss_sum = 0.0
        self._loss_count = 0
        self._last_mean_loss = math.nan

    def after_step(
        self, mean_loss: float, skipped: bool = False, small_sq_norm: float | None = None,
        big_sq_norm: float | None = None,
    ) -> bool:
        """Records one optimizer step; True when the run has diverged and must stop now."""
        self.step += 1
        if self.noise is not None and small_sq_norm is not None and big_sq_norm is not None:
            self.noise.update(float(small_sq_norm), float(big_sq_norm))
        mean_loss = float(mean_loss)
        if skipped or not math.isfinite(mean_loss) or mean_loss > DIVERGENCE_LOSS:
            self.stopped = "diverged"
            self._last_mean_loss = mean_loss
            return True
        self._loss_sum += mean_loss
        self._loss_count += 1
        return False

    def wants_evaluation(self) -> bool:
        """True when the step just taken is an evaluation step."""
        return self.step in self.evaluation_steps

    def after_evaluation(self, accuracy: float, loss: float) -> bool:
        """Records the validation accuracy and loss at this step; True when the run is over."""
        self.trace.append([self.step, float(accuracy), float(loss)])
        if self.noise is not None and self.noise.value is not None:
            self.noise_trace.append([self.step, self.noise.value])
        self._last_mean_loss = self._loss_sum / self._loss_count if self._loss_count else math.nan
        self._loss_sum, self._loss_count = 0.0, 0
        if self.stop_at_target and all(steps_to_target(self._pairs(), t) is not None for t in self.targets):
            self.stopped = "target"
            return True
        if self.step >= self.total_steps:
            self.stopped = "budget"
            return True
        return False

    def _pairs(self) -> list[tuple[float, float]]:
        return [(step, accuracy) for step, accuracy, _ in self.trace]

    def b_simple_at(self, step: int | None) -> float | None:
        """The noise-scale estimate at the last evaluation at or before ``step`` (None if none)."""
        if step is None:
            return None
        values = [b for s, b in self.noise_trace if s <= step]
        return values[-1] if values else None

    def result(self, test_loss: float, test_accuracy: float, **extra: Any) -> dict[str, Any]:
        """The run's record: steps to each target, traces, how it stopped, the test numbers, ``extra``."""
        reached = {target_key(t): steps_to_target(self._pairs(), t) for t in self.targets}
        first = reached[target_key(self.targets[0])]
        accuracies = [accuracy for _, accuracy, _ in self.trace]
        return {
            "steps_to_target": reached,
            "examples_to_target": {k: None if v is None else v * self.global_batch for k, v in reached.items()},
            "stopped": self.stopped or "budget",
            "steps": self.step,
            "best_validation_accuracy": max(accuracies) if accuracies else None,
            "final_validation_accuracy": accuracies[-1] if accuracies else None,
            "trace": self.trace,
            "noise_scale": self.noise_trace,
            "b_simple_at_target": self.b_simple_at(first),
            "b_simple_final": self.noise_trace[-1][1] if self.noise_trace else None,
            "train_loss": self._last_mean_loss,
            "test_loss": float(test_loss),
            "test_accuracy": float(test_accuracy),
            **extra,
        }


def summary_line(result: Mapping[str, Any]) -> str:
    """One line for the progress output: steps to each target, how the run stopped, test accuracy."""
    reached = ", ".join(
        f"{float(k) * 100:g}% at step {v}" if v is not None else f"{float(k) * 100:g}% not reached"
        for k, v in result["steps_to_target"].items()
    )
    return (
        f"{reached}; stopped: {result['stopped']} after {result['steps']} steps; "
        f"best val {100 * (result['best_validation_accuracy'] or 0):.2f}%, test {100 * result['test_accuracy']:.2f}%"
    )
