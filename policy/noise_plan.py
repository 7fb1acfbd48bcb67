"""Every random draw of a rollout as an explicit tensor, from one seed.

A ``NoisePlan`` holds each chunk's initial noise ``initial [L, f, C, H, W]`` and each re-noise draw
``renoise [L, T-1, f, C, H, W]`` (the draw used after step ``k`` of chunk ``c`` is ``renoise[c, k]``).
Draws come from a CPU ``torch.Generator`` seeded with ``seed`` in a fixed order (initial, then
re-noise, then whatever a fork needs), so a seed names the same tensors on every machine.

Forks (chunk indices are 0-based):
- ``fork(pivot, G, sigma)``: AR-CoPO. Branches share every draw except chunk ``pivot``'s initial
  noise, ``sqrt(1 - sigma^2) * eps* + sigma * delta_i`` with ``delta_i`` the next draws of the stream.
- ``fork_renoise(pivot, G)``: SDE-GRPO. Branches share every initial noise; each branch gets its own
  re-noise draws in chunk ``pivot`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


@dataclass(frozen=True)
class NoisePlan:
    seed: int
    initial: torch.Tensor  # [L, f, C, H, W]
    renoise: torch.Tensor  # [L, T-1, f, C, H, W]
    stream_state: torch.Tensor  # generator state after the plan's own draws

    @classmethod
    def from_seed(
        cls,
        seed: int,
        num_chunks: int,
        frames_per_chunk: int,
        latent_shape: tuple[int, int, int],
        num_steps: int,
    ) -> NoisePlan:
        if num_chunks < 1 or frames_per_chunk < 1 or num_steps < 1:
            raise ValueError(
                f"num_chunks={num_chunks}, frames_per_chunk={frames_per_chunk}, num_steps={num_steps} must be >= 1"
            )
        gen = _generator(seed)
        chunk = (frames_per_chunk, *latent_shape)
        initial = torch.randn((num_chunks, *chunk), generator=gen)
        renoise = torch.randn((num_chunks, num_steps - 1, *chunk), generator=gen)
        return cls(seed=int(seed), initial=initial, renoise=renoise, stream_state=gen.get_state())

    @property
    def num_chunks(self) -> int:
        return self.initial.shape[0]

    @property
    def frames_per_chunk(self) -> int:
        return self.initial.shape[1]

    @property
    def num_steps(self) -> int:
        return self.renoise.shape[1] + 1

    def _stream(self) -> torch.Generator:
        gen = torch.Generator(device="cpu")
        gen.set_state(self.stream_state)
        return gen

    def _check_fork(self, pivot: int, group_size: int) -> None:
        if not 0 <= pivot < self.num_chunks:
            raise ValueError(f"pivot={pivot} must be a 0-based chunk index in 0..{self.num_chunks - 1}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")

    def fork(self, pivot: int, group_size: int, sigma: float) -> GroupNoisePlan:
        """G branches differing only in chunk ``pivot``'s initial noise (AR-CoPO neighbours)."""
        self._check_fork(pivot, group_size)
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"sigma must be in [0, 1], got {sigma}")
        deltas = torch.randn((group_size, *self.initial.shape[1:]), generator=self._stream())
        base = self.initial[pivot]
        pivot_initial = math.sqrt(1.0 - sigma * sigma) * base + sigma * deltas
        return GroupNoisePlan(
            base=self,
            pivot=pivot,
            group_size=group_size,
            sigma=float(sigma),
            exploration="initial_noise",
            pivot_initial=pivot_initial,
            pivot_renoise=self.renoise[pivot].expand(group_size, *self.renoise.shape[1:]),
            deltas=deltas,
        )

    def fork_renoise(self, pivot: int, group_size: int) -> GroupNoisePlan:
        """G branches sharing all initial noise, each with its own re-noise draws in chunk ``pivot``."""
        self._check_fork(pivot, group_size)
        draws = torch.randn((group_size, *self.renoise.shape[1:]), generator=self._stream())
        return GroupNoisePlan(
            base=self,
            pivot=pivot,
            group_size=group_size,
            sigma=0.0,
            exploration="renoise",
            pivot_initial=self.initial[pivot].expand(group_size, *self.initial.shape[1:]),
            pivot_renoise=draws,
            deltas=None,
        )


@dataclass(frozen=True)
class GroupNoisePlan:
    base: NoisePlan
    pivot: int
    group_size: int
    sigma: float
    exploration: Literal["initial_noise", "renoise"]
    pivot_initial: torch.Tensor  # [G, f, C, H, W]
    pivot_renoise: torch.Tensor  # [G, T-1, f, C, H, W]
    deltas: torch.Tensor | None  # [G, f, C, H, W] for initial-noise forks

    @property
    def seed(self) -> int:
        return self.base.seed

    @property
    def num_chunks(self) -> int:
        return self.base.num_chunks

    def initial_noise(self, chunk: int) -> torch.Tensor:
        """``[G, f, C, H, W]`` at the pivot, else the shared draw ``[1, f, C, H, W]``."""
        return self.pivot_initial if chunk == self.pivot else self.base.initial[chunk][None]

    def renoise_draw(self, chunk: int, step: int) -> torch.Tensor:
        """Noise used after step ``step`` of ``chunk``: ``[G, ...]`` at the pivot, else ``[1, ...]``."""
        if chunk == self.pivot:
            return self.pivot_renoise[:, step]
        return self.base.renoise[chunk, step][None]

    def branch(self, i: int) -> NoisePlan:
        """Branch ``i`` as a standalone plan (what an independent rollout of that branch would use)."""
        if not 0 <= i < self.group_size:
            raise IndexError(f"branch {i} outside 0..{self.group_size - 1}")
        initial = self.base.initial.clone()
        renoise = self.base.renoise.clone()
        initial[self.pivot] = self.pivot_initial[i]
        renoise[self.pivot] = self.pivot_renoise[i]
        return NoisePlan(seed=self.base.seed, initial=initial, renoise=renoise, stream_state=self.base.stream_state)
