"""Random candidate groups of any size, for benchmarks, tests and store smoke checks."""

from __future__ import annotations

import uuid

import torch

from replay.record import CandidateGroup

# Real Wan2.1-1.3B at 480p: latent frame 16 x 60 x 104, 3 frames a chunk, 4 steps, G = 12, 7 chunks.
REAL_480P = dict(channels=16, height=60, width=104, frames_per_chunk=3, num_steps=4, group_size=12, num_chunks=7)
# The pocket world's scale.
POCKET = dict(channels=4, height=8, width=8, frames_per_chunk=2, num_steps=4, group_size=4, num_chunks=4)


def synthetic_group(
    *,
    channels: int = 4,
    height: int = 8,
    width: int = 8,
    frames_per_chunk: int = 2,
    num_steps: int = 4,
    group_size: int = 4,
    num_chunks: int = 4,
    pivot: int = 1,
    dtype: torch.dtype = torch.float32,
    with_final: bool = False,
    policy_version: int = 0,
    group_id: str | None = None,
    seed: int = 0,
    heads: tuple[str, ...] = ("VQ", "MQ", "TA"),
    created_at: float | None = None,
) -> CandidateGroup:
    """A valid group filled with seeded Gaussian values (the shapes are what matters)."""
    gen = torch.Generator().manual_seed(seed)
    G, T, f, chw = group_size, num_steps, frames_per_chunk, (channels, height, width)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return CandidateGroup(
        group_id=group_id or uuid.uuid4().hex,
        prompt=f"a synthetic prompt {seed}",
        prompt_key=f"key-{seed}",
        adapter_name="on_policy",
        policy_version=policy_version,
        pivot=pivot,
        num_chunks=num_chunks,
        group_size=G,
        sigma=0.5,
        noise_seed=seed,
        exploration="initial_noise",
        prefix_latents=randn(pivot * f, *chw),
        timesteps=torch.tensor([1000.0, 937.5, 833.3333, 625.0][:T] + [500.0] * max(0, T - 4), dtype=torch.float32),
        pivot_inputs=randn(G, T, f, *chw),
        pivot_x0=randn(G, T, f, *chw),
        final_latents=randn(G, num_chunks * f, *chw) if with_final else None,
        rewards={h: torch.randn(G, generator=gen, dtype=torch.float64) for h in heads},
        reward_valid=torch.rand(G, generator=gen) > 0.1,
        **({} if created_at is None else {"created_at": created_at}),
    )
