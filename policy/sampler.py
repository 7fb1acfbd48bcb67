"""Few-step consistency sampler of the Self-Forcing family.

Timesteps: the configured list (default ``[1000, 750, 500, 250]``) warped through the flow-matching
shift on the 1000-step training grid, ``sigma' = shift * s / (1 + (shift - 1) * s)`` with
``s = step / num_train_timesteps``, giving ``[1000, 937.5, 833.33.., 625]`` for shift 5.

Per-chunk step lists: ``first_chunk_step_list`` (Causal-Forcing's ``denoising_step_list_first_chunk``)
replaces the list for chunk 0 only. Causal-Forcing++ ``framewise-2step`` samples chunk 0 with
``[1000, 750, 500, 250]`` and later chunks with ``[1000, 500]``; ``framewise-1step`` with ``[1000]``.
A noise plan holds ``num_steps - 1`` re-noise draws a chunk (the longest list); a chunk with ``T_c``
steps uses the first ``T_c - 1`` of them.

One denoising step on a chunk: the model predicts the flow ``v``; ``x0 = x_t - sigma * v``; the next
input is ``x' = (1 - sigma') x0 + sigma' (sqrt(1 - eta^2) eps_hat + eta eps')`` with
``eps_hat = (x_t - (1 - sigma) x0) / sigma`` the noise implied by the current input and ``eps'`` the
noise plan's re-noise draw. ``eta = 1`` is Self-Forcing's re-noise with a fresh Gaussian. After the
last step the clean ``x0`` is run once more at ``t = 0`` to write the chunk into the KV cache, so a
chunk costs ``T + 1`` forwards. All arithmetic of a step is in float64.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SamplerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    denoising_step_list: tuple[int, ...] = Field(default=(1000, 750, 500, 250))
    first_chunk_step_list: tuple[int, ...] | None = None  # chunk 0's own list; None: the same as the rest
    shift: float = Field(default=5.0, gt=0)
    num_train_timesteps: int = Field(default=1000, gt=0)
    eta: float = Field(default=1.0, ge=0.0, le=1.0)
    warp_denoising_step: bool = True
    context_timestep: float = Field(default=0.0, ge=0.0)

    @field_validator("denoising_step_list", "first_chunk_step_list")
    @classmethod
    def _descending(cls, steps: tuple[int, ...] | None, info) -> tuple[int, ...] | None:
        if steps is None:
            return None
        if not steps:
            raise ValueError(f"{info.field_name} must not be empty")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"{info.field_name} must be strictly decreasing, got {list(steps)}")
        return steps

    @model_validator(mode="after")
    def _in_range(self) -> SamplerConfig:
        for name in ("denoising_step_list", "first_chunk_step_list"):
            bad = [s for s in getattr(self, name) or () if not 0 < s <= self.num_train_timesteps]
            if bad:
                raise ValueError(f"{name} entries {bad} are outside (0, {self.num_train_timesteps}]")
        return self

    @property
    def per_chunk(self) -> bool:
        """Whether chunk 0 has a step list of its own."""
        return self.first_chunk_step_list is not None and self.first_chunk_step_list != self.denoising_step_list

    @property
    def num_steps(self) -> int:
        """Steps of the longest list: a noise plan's re-noise draws a chunk are ``num_steps - 1``."""
        return max(len(self.denoising_step_list), len(self.first_chunk_step_list or ()))

    def step_list(self, chunk: int | None = None) -> tuple[int, ...]:
        """The (unwarped) step list of 0-based ``chunk``; ``None`` only when every chunk shares one."""
        if chunk is None:
            if self.per_chunk:
                raise ValueError(
                    "this sampler's step list depends on the chunk (first_chunk_step_list is set): pass chunk="
                )
            return self.denoising_step_list
        if chunk < 0:
            raise ValueError(f"chunk must be a 0-based chunk index, got {chunk}")
        return self.first_chunk_step_list if chunk == 0 and self.first_chunk_step_list else self.denoising_step_list

    def chunk_num_steps(self, chunk: int) -> int:
        return len(self.step_list(chunk))

    def warped_timesteps(self, chunk: int | None = None) -> list[float]:
        """The timesteps fed to the model for ``chunk``, in model units (float64 values)."""
        n = self.num_train_timesteps
        steps = self.step_list(chunk)
        if not self.warp_denoising_step:
            return [float(s) for s in steps]
        out = []
        for step in steps:
            s = step / n
            out.append(n * self.shift * s / (1.0 + (self.shift - 1.0) * s))
        return out

    def timesteps(self, device: torch.device | str | None = None, chunk: int | None = None) -> torch.Tensor:
        """``[T_chunk]`` float32: what rollouts record and the model sees (exactly representable in records)."""
        return torch.tensor(self.warped_timesteps(chunk), dtype=torch.float32, device=device)

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.to(torch.float64) / self.num_train_timesteps


def _bcast(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64, device=like.device)
    return s.reshape(s.shape + (1,) * (like.ndim - s.ndim)) if s.ndim else s


def x0_from_flow(x_t: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x0 = x_t - sigma * v`` in float64, returned in ``x_t``'s dtype. ``sigma``: scalar or ``[B]``."""
    s = _bcast(sigma, x_t)
    return (x_t.to(torch.float64) - s * flow.to(torch.float64)).to(x_t.dtype)


def renoise(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise: torch.Tensor,
    eta: float = 1.0,
) -> torch.Tensor:
    """Next step's input from the current input, its x0 prediction and the plan's noise draw."""
    s_next = _bcast(sigma_next, x0)
    x0d = x0.to(torch.float64)
    mixed = noise.to(torch.float64)
    if eta != 1.0:
        s = _bcast(sigma, x0)
        eps_hat = (x_t.to(torch.float64) - (1.0 - s) * x0d) / s
        mixed = math.sqrt(1.0 - eta * eta) * eps_hat + eta * mixed
    return ((1.0 - s_next) * x0d + s_next * mixed).to(x0.dtype)
