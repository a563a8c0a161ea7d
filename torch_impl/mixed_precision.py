"""Half-precision parameters in the torch optimizers: float32 math and float32 state around the update rules.

The update rules of ``momentum_functional.py`` and ``lamb_functional.py`` are
written once, for one dtype. For a float16 or bfloat16 parameter ``w`` the
functions there run them on float32 working copies:

.. code-block:: text

    w32 = float32(w) ;  g32 = float32(g)          # exact: every half value is a float32 value
    (the rule on w32, g32 and the float32 state)   # norms, trust ratios, moments: float32
    w   = round_to_half(w32)                       # once per step

and the optimizer keeps the state of such a parameter (velocity, Adam
moments) in float32 (:func:`state_dtype`). This is what the half-precision
failure modes need: ``g*g`` underflows in float16 and ``mu / (sqrt(nu) + eps)``
overflows it (LAMB's first step would write Inf), and a float16 norm
overflows at 65504 for a finite gradient. float32 and float64 tensors are
used as they are (no copy).

There are no float32 master weights: the new weight is rounded to the
parameter's dtype each step, so an update smaller than half a unit in the
last place of ``w`` (2^-11 relative in float16, 2^-8 in bfloat16) is lost.
For long runs keep float32 parameters and use ``torch.autocast`` (README,
"Mixed precision"); half parameters suit short fine-tuning and models that
do not fit otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["HALF_DTYPES", "state_dtype", "float32_working_copies", "write_back", "check_state_dtypes"]

#: Parameter dtypes whose update math and state are promoted to float32.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype of the optimizer state of ``param``: float32 for a half tensor, else its own dtype."""
    return torch.float32 if param.dtype in HALF_DTYPES else param.dtype


def float32_working_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each half tensor as a new float32 tensor (exact); every other tensor itself (not copied)."""
    return [t.to(torch.float32) if t.dtype in HALF_DTYPES else t for t in tensors]


def write_back(targets: Sequence[torch.Tensor], working: Sequence[torch.Tensor]) -> None:
    """Copies each working copy into its half-precision target (rounding to nearest); others were updated in place."""
    for target, copy in zip(targets, working):
        if copy is not target:
            target.copy_(copy)


def check_state_dtypes(params: Sequence[torch.Tensor], states: Sequence[torch.Tensor], argument: str) -> None:
    """Raises ``ValueError`` naming ``argument`` when a state tensor's dtype is not :func:`state_dtype` of its param.

    A half-precision state would bring back the overflow the float32 math avoids.
    """
    for index, (param, state) in enumerate(zip(params, states)):
        expected = state_dtype(param)
        if state.dtype != expected:
            raise ValueError(
                f"{argument}[{index}] has dtype {state.dtype} for a {param.dtype} parameter; "
                f"the state of a {param.dtype} parameter must be {expected}"
            )
