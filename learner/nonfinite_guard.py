"""A guard on every optimiser step: a step whose loss or gradients are not finite is not taken.

NaN or inf in one step's loss or gradients would, once stepped, turn every LoRA parameter (and the
optimiser's moments) into NaN with no error. The guard skips such a step (no optimiser step, the
gradients dropped, so the adapter and the optimiser state stay as they were), logs it with the
groups it came from and counts it. `max_in_row` skipped steps in a row mean the run no longer
learns anything (a diverged adapter, a broken reward), so the guard stops it with `NonFiniteUpdateError`.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


class NonFiniteUpdateError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient norm."""


class NonFiniteGuard:
    def __init__(self, max_in_row: int) -> None:
        if max_in_row < 1:
            raise ValueError(f"max_in_row must be >= 1, got {max_in_row}")
        self.max_in_row = max_in_row
        self.in_row = 0
        self.skipped = 0  # over this process's life

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], loss: float, max_grad_norm: float,
             group_ids: list[str]) -> tuple[bool, float]:
        """Clip the gradients and take the optimiser step if `loss` and the gradient norm are finite.

        Returns (stepped, gradient norm before clipping)."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
            self.in_row = 0
            return True, grad_norm
        optimizer.zero_grad(set_to_none=True)
        self.in_row += 1
        self.skipped += 1
        log.error("skipped an optimiser step: loss %s, gradient norm %s (groups %s); %d in a row, the run stops at %d",
                  loss, grad_norm, ", ".join(group_ids), self.in_row, self.max_in_row)
        if self.in_row >= self.max_in_row:
            raise NonFiniteUpdateError(
                f"{self.in_row} optimiser steps in a row had a non-finite loss or gradient norm (last: loss {loss}, "
                f"gradient norm {grad_norm}, groups {', '.join(group_ids)}); the adapter was left as it was before "
                f"them. Stopping (algorithm.max_nonfinite_steps={self.max_in_row}): lower algorithm.learning_rate "
                "or check the reward heads, then resume from the newest checkpoint with --resume."
            )
        return False, grad_norm
