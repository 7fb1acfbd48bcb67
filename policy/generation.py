"""Batched streaming generation from explicit noise plans, for any ``StreamingVideoPolicy``.

``policy.rollout.generate`` runs one video; evaluation and the entropy study run many. This runs a
batch through the same per-chunk denoising (``policy.rollout.denoise_chunk``: T steps, re-noise from the
plan, a final t = 0 pass writing the KV cache), each row with its own prompt and its own plan, so row
``i`` is the video ``generate`` makes from plan ``i`` (up to float rounding of batched kernels).
"""

from __future__ import annotations

import torch

from policy.noise_plan import NoisePlan
from policy.pipeline import StreamingVideoPolicy
from policy.rollout import denoise_chunk


def plans_for_seeds(policy: StreamingVideoPolicy, seeds: list[int]) -> list[NoisePlan]:
    return [
        NoisePlan.from_seed(s, policy.num_chunks, policy.frames_per_chunk, policy.latent_shape, policy.num_steps)
        for s in seeds
    ]


def text_for(policy: StreamingVideoPolicy, prompts: list[str]) -> torch.Tensor:
    """The policy's text conditioning, or an all-zero one for a policy built without a text encoder."""
    if policy.text_encoder is not None:
        return policy.text_conditioning(prompts)
    dim = policy.transformer.config.text_dim
    return torch.zeros(len(prompts), 8, dim, device=policy.device, dtype=policy.dtype)


@torch.no_grad()
def generate_from_noise(
    policy: StreamingVideoPolicy,
    text_cond: torch.Tensor,
    initial: torch.Tensor,
    renoise: torch.Tensor,
) -> torch.Tensor:
    """Latents ``[B, F, C, H, W]`` from ``text_cond [B, S, D]``, ``initial [B, L, f, C, H, W]`` and
    ``renoise [B, L, T-1, f, C, H, W]``."""
    b, chunks = initial.shape[:2]
    if chunks != policy.num_chunks or renoise.shape[:3] != (b, chunks, policy.num_steps - 1):
        raise ValueError(
            f"noise shapes {tuple(initial.shape)} / {tuple(renoise.shape)} do not match the policy "
            f"({policy.num_chunks} chunks, {policy.num_steps} steps)"
        )
    if text_cond.shape[0] != b:
        raise ValueError(f"text_cond has batch {text_cond.shape[0]}, the noise {b}")
    cache = policy.new_cache(b)
    text_cond = text_cond.to(policy.device, policy.dtype)
    f = policy.frames_per_chunk
    out = []
    for c in range(chunks):
        x0, _, _ = denoise_chunk(policy, cache, text_cond, initial[:, c], c * f, lambda k, c=c: renoise[:, c, k])
        out.append(x0)
    return torch.cat(out, dim=1)


def generate_videos(
    policy: StreamingVideoPolicy,
    prompts: list[str],
    seeds: list[int],
    batch_size: int = 32,
) -> torch.Tensor:
    """Latents ``[N, F, C, H, W]``: prompt ``i`` generated from ``NoisePlan.from_seed(seeds[i])``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for lo in range(0, len(prompts), batch_size):
        plans = plans_for_seeds(policy, seeds[lo : lo + batch_size])
        out.append(
            generate_from_noise(
                policy,
                text_for(policy, prompts[lo : lo + batch_size]),
                torch.stack([p.initial for p in plans]),
                torch.stack([p.renoise for p in plans]),
            )
        )
    return torch.cat(out)
