"""`CandidateGroup`: one forked group of rollouts, everything the learner needs and nothing more.

A group is G branches of one video that share every random draw except chunk `pivot`'s initial
noise (AR-CoPO) or chunk `pivot`'s re-noise draws (SDE-GRPO). The learner never re-runs the
rollout: it rebuilds the prefix KV cache from `prefix_latents`, replays the pivot chunk's T steps
from `pivot_inputs` at `timesteps`, and compares with the old predictions `pivot_x0`.

Tensors go in as torch tensors (numpy arrays are converted) and come out as torch tensors.
Latent tensors may be float32, float16 or bfloat16 (float64 is accepted too); rewards are float64,
`reward_valid` is bool. Shapes (frames-first, see docs/ARCHITECTURE.md):

    prefix_latents  [pivot * f, C, H, W]      clean chunks 0..pivot-1, shared (0 frames at pivot 0)
    timesteps       [T]                       model units 0..1000
    pivot_inputs    [G, T, f, C, H, W]        x_t fed at each step of chunk `pivot`, every branch
    pivot_x0        [G, T, f, C, H, W]        old x0 predictions at those inputs
    final_latents   [G, num_chunks * f, C, H, W] or None (only endpoint objectives need it)
    rewards         {head: [G]} float64
    reward_valid    [G] bool

What one group costs, real Wan2.1-1.3B at 480p in bfloat16 (latent frame 16 x 60 x 104 = 99,840
values = 199,680 bytes; f = 3, T = 4, G = 12, L = 7 so F = 21):

    pivot_inputs    12 * 4 * 3 frames = 144 frames = 28,753,920 bytes
    pivot_x0        the same                        = 28,753,920 bytes
    prefix_latents  3 * pivot frames: 0 (pivot 0), 1,797,120 (pivot 3), 3,594,240 (pivot 6)
    final_latents   12 * 21 frames = 252 frames     = 50,319,360 bytes

    without final_latents: 57,507,840 .. 61,102,080 bytes (59,304,960 at pivot 3; about 57 MiB)
    with final_latents:   107,827,200 .. 111,421,440 bytes (109,624,320 at pivot 3; about 105 MiB)

The header, timesteps and rewards add well under 10 KB; the Arrow encoding adds a few KB more.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 2  # 2: schedule_chunks / schedule_prompts (prompts per chunk)

LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TENSOR_FIELDS = ("prefix_latents", "timesteps", "pivot_inputs", "pivot_x0", "final_latents", "reward_valid")


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """A torch tensor from a torch tensor or a numpy array (shared memory where possible)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


class CandidateGroup(BaseModel):
    """One forked candidate group (see the module docstring for shapes and sizes)."""

    # hide_input_in_errors: an error message must not print (slowly) the tensors themselves
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", frozen=True, hide_input_in_errors=True)

    schema_version: int = SCHEMA_VERSION
    group_id: str = Field(min_length=1, max_length=512)
    prompt: str
    prompt_key: str
    adapter_name: str
    policy_version: int = Field(ge=0)
    pivot: int = Field(ge=0)
    num_chunks: int = Field(ge=1)
    group_size: int = Field(ge=1)
    sigma: float = Field(ge=0.0)
    noise_seed: int = Field(ge=0, lt=2**64)
    exploration: Literal["initial_noise", "renoise"]
    # The prompt each chunk was generated with, from chunk schedule_chunks[i] on (LongLive's prompt
    # switches); empty: `prompt` throughout. `prompt` stays what the rewards scored.
    schedule_chunks: list[int] = Field(default_factory=list)
    schedule_prompts: list[str] = Field(default_factory=list)
    prefix_latents: torch.Tensor
    timesteps: torch.Tensor
    pivot_inputs: torch.Tensor
    pivot_x0: torch.Tensor
    final_latents: torch.Tensor | None = None
    rewards: dict[str, torch.Tensor]
    reward_valid: torch.Tensor
    created_at: float = Field(default_factory=time.time, ge=0.0)

    @field_validator("prefix_latents", "timesteps", "pivot_inputs", "pivot_x0", "final_latents", mode="before")
    @classmethod
    def _float_tensor(cls, value: Any, info) -> torch.Tensor | None:
        if value is None:
            return None
        t = as_tensor(value, info.field_name)
        if t.dtype not in LATENT_DTYPES:
            raise ValueError(f"{info.field_name} has dtype {t.dtype}; allowed: float32, float16, bfloat16, float64")
        return t

    @field_validator("reward_valid", mode="before")
    @classmethod
    def _bool_tensor(cls, value: Any) -> torch.Tensor:
        t = as_tensor(value, "reward_valid")
        if t.dtype != torch.bool:
            raise ValueError(f"reward_valid must be bool, got {t.dtype}")
        return t

    @field_validator("rewards", mode="before")
    @classmethod
    def _reward_tensors(cls, value: Any) -> dict[str, torch.Tensor]:
        if not isinstance(value, dict):
            raise ValueError(f"rewards must be a dict head -> [G] array, got {type(value).__name__}")
        out = {}
        for head, scores in value.items():
            if not isinstance(head, str) or not head:
                raise ValueError(f"reward head names must be non-empty strings, got {head!r}")
            t = as_tensor(scores, f"rewards[{head!r}]")
            if t.is_complex():
                raise ValueError(f"rewards[{head!r}] must be real numbers, got {t.dtype}")
            out[head] = t.to(torch.float64)
        return out

    @field_validator("sigma", "created_at")
    @classmethod
    def _finite(cls, value: float, info) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{info.field_name} must be finite, got {value}")
        return value

    @model_validator(mode="after")
    def _check_shapes(self) -> CandidateGroup:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is not {SCHEMA_VERSION}, the version this code writes"
            )
        if self.pivot >= self.num_chunks:
            raise ValueError(f"pivot {self.pivot} must be < num_chunks {self.num_chunks} (0-based chunk index)")
        chunks = self.schedule_chunks
        if len(chunks) != len(self.schedule_prompts):
            raise ValueError(f"{len(chunks)} schedule_chunks but {len(self.schedule_prompts)} schedule_prompts")
        if chunks and (chunks[0] != 0 or any(a >= b for a, b in zip(chunks, chunks[1:])) or chunks[-1] >= self.num_chunks):
            raise ValueError(f"schedule_chunks {chunks} must start at 0 and increase strictly below num_chunks")
        G = self.group_size
        if self.timesteps.ndim != 1 or self.timesteps.shape[0] < 1:
            raise ValueError(f"timesteps must be [T] with T >= 1, got {_shape(self.timesteps)}")
        T = int(self.timesteps.shape[0])
        pi = self.pivot_inputs
        if pi.ndim != 6:
            raise ValueError(f"pivot_inputs must be [G, T, f, C, H, W], got {_shape(pi)}")
        if pi.shape[0] != G or pi.shape[1] != T or pi.shape[2] < 1:
            raise ValueError(
                f"pivot_inputs {_shape(pi)} disagrees with the header: expected [G={G}, T={T}, f>=1, C, H, W]"
            )
        f, chw = int(pi.shape[2]), _shape(pi)[3:]
        if _shape(self.pivot_x0) != _shape(pi):
            raise ValueError(f"pivot_x0 {_shape(self.pivot_x0)} must have the shape of pivot_inputs {_shape(pi)}")
        expected_prefix = (self.pivot * f, *chw)
        if _shape(self.prefix_latents) != expected_prefix:
            raise ValueError(
                f"prefix_latents {_shape(self.prefix_latents)} disagrees with the header: expected "
                f"[pivot*f={self.pivot}*{f}, C, H, W] = {list(expected_prefix)}"
            )
        if self.final_latents is not None:
            expected_final = (G, self.num_chunks * f, *chw)
            if _shape(self.final_latents) != expected_final:
                raise ValueError(
                    f"final_latents {_shape(self.final_latents)} disagrees with the header: expected "
                    f"[G, num_chunks*f, C, H, W] = {list(expected_final)}"
                )
        for head, scores in self.rewards.items():
            if _shape(scores) != (G,):
                raise ValueError(f"rewards[{head!r}] must be [G={G}], got {_shape(scores)}")
        if _shape(self.reward_valid) != (G,):
            raise ValueError(f"reward_valid must be [G={G}], got {_shape(self.reward_valid)}")
        return self

    @property
    def prompt_schedule(self) -> list[tuple[int, str]]:
        """``[(first chunk, prompt), ...]`` the video was generated with."""
        return list(zip(self.schedule_chunks, self.schedule_prompts)) or [(0, self.prompt)]

    @property
    def frames_per_chunk(self) -> int:
        return int(self.pivot_inputs.shape[2])

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (what the Arrow payload costs, less a few KB of framing)."""
        total = sum(t.numel() * t.element_size() for t in self.tensors().values())
        return total + sum(t.numel() * t.element_size() for t in self.rewards.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields present in this record (not the rewards), in a fixed order."""
        out = {name: getattr(self, name) for name in TENSOR_FIELDS}
        return {k: v for k, v in out.items() if v is not None}

    def header(self) -> dict[str, Any]:
        """The scalar fields (everything but the tensors and rewards)."""
        skip = set(TENSOR_FIELDS) | {"rewards"}
        return {k: getattr(self, k) for k in type(self).model_fields if k not in skip}
