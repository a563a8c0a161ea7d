"""The Keras adapter of the shared optimizer table (``tests/optimizer_cases.py``): core spelling -> Keras.

It turns a row's core-spelling hyperparameters into ``create_optimizer``
arguments in Keras spelling (``lr`` -> ``learning_rate``, ``eps`` ->
``epsilon``, ``beta1`` -> ``beta_1``), creates the table's tensors as float64
Keras variables under the same path (``fc.weight`` at ``fc/weight``), steps
the optimizer with the table's gradients, LR sequence and CLARS norms, reads
its slots under the core's names, and says which message a core error becomes
in Keras spelling. The spelling map is written out here on purpose (not
imported from the library), so the test checks the library's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hvd_largebatch.tf import create_optimizer
from optimizer_cases import NAMES, TENSORS, Case, clars_norms, gradients

#: Core record names -> Keras argument names.
KERAS_NAME = {"lr": "learning_rate", "eps": "epsilon", "beta1": "beta_1", "beta2": "beta_2"}


def keras_kwargs(hyper: dict[str, Any]) -> dict[str, Any]:
    """Core-spelling hyperparameters as Keras constructor arguments."""
    return {KERAS_NAME.get(k, k): v for k, v in hyper.items()}


def keras_message(core_message: str) -> str:
    """The message Keras shows for a core error: the argument is named as the Keras user wrote it."""
    for core, keras_name in KERAS_NAME.items():
        if core_message.startswith(core + " "):
            return keras_name + core_message[len(core):]
    return core_message


def keras_path(name: str) -> str:
    return name.replace(".", "/")


PATHS = tuple(keras_path(name) for name in NAMES)


def make_variables(weights: dict[str, np.ndarray]) -> list[keras.Variable]:
    """The table's tensors as float64 variables, in table order, each at its path (``layer1/0/bn1/weight``)."""
    variables = []
    for name, _ in TENSORS:
        *scopes, leaf = name.split(".")
        with contextlib.ExitStack() as stack:
            for scope in scopes:
                stack.enter_context(keras.name_scope(scope))
            variables.append(keras.Variable(weights[name], name=leaf, dtype="float64"))
    assert tuple(v.path for v in variables) == PATHS
    return variables


def make_keras(case: Case, weights: dict[str, np.ndarray], **extra: Any):
    """``(variables, built optimizer)`` for ``case`` starting from ``weights``; ``extra`` are Keras-only options."""
    variables = make_variables(weights)
    kwargs = {**keras_kwargs(case.hyper), **case.exclusions(), **extra}
    optimizer = create_optimizer(case.name, learning_rate=case.lr(0), **kwargs)
    optimizer.build(variables)
    return variables, optimizer


def step_function(optimizer, variables, graph: bool = True):
    """``apply(grads)`` as ``model.fit`` runs it (a ``tf.function``), or eagerly."""

    def apply(grads):
        optimizer.apply(grads, variables)

    return tf.function(apply) if graph else apply


def keras_step(case: Case, optimizer, apply, step: int, grads=None) -> None:
    grads = gradients(step) if grads is None else grads
    optimizer.learning_rate = case.lr(step)
    if case.name == "clars":
        optimizer.set_grad_norms({n.replace(".", "/"): s for n, s in clars_norms(step).items()})
    apply([tf.constant(grads[n]) for n in NAMES])


def state_in_core_names(case: Case, optimizer) -> dict[str, dict[str, np.ndarray]]:
    """The slots as the oracle names them.

    The momentum slot holds ``m = -v`` (Keras's sign), converted back here;
    LAMB's slots hold ``mu`` and ``nu`` as the oracle does.
    """
    if case.has_momentum_buffer:
        return {"velocity": {n: -v.numpy() for n, v in zip(NAMES, optimizer.momentums)}}
    return {
        "mu": {n: v.numpy() for n, v in zip(NAMES, optimizer.first_moments)},
        "nu": {n: v.numpy() for n, v in zip(NAMES, optimizer.second_moments)},
    }


def weights_of(variables) -> dict[str, np.ndarray]:
    return {n: v.numpy() for n, v in zip(NAMES, variables)}
