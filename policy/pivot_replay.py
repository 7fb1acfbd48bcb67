"""Replay of the pivot chunk with gradients: ``x0 = F_theta(x_t, context, t)`` for a batch of anchors.

The context is rebuilt from the stored clean prefix latents exactly as generation built it: one
``t = 0`` forward per prefix chunk writing the KV cache, without gradient (for a windowed policy
whose group re-cached at a far pivot, only the chunks up to the first window's end and one re-cache
forward: ``policy.recache.rebuild_context``). The cache is then repeated
along the batch and the pivot chunk runs once with gradient (the chunk's own K/V and the text K/V
are recomputed inside the graph, so adapters on every projection receive gradient).
"""

from __future__ import annotations

import torch

from policy.kv_cache import KVCache
from policy.pipeline import StreamingVideoPolicy
from policy.recache import TextSchedule, rebuild_context
from policy.sampler import x0_from_flow


def rebuild_prefix_cache(
    policy: StreamingVideoPolicy, text_cond: torch.Tensor | TextSchedule, prefix_latents: torch.Tensor
) -> KVCache:
    """Batch-1 KV cache holding the clean prefix ``[pivot * f, C, H, W]`` (no gradient), as the rollout
    built it; prompt switches and a long video's pivot re-cache included (``policy.recache.rebuild_context``)."""
    if not isinstance(text_cond, TextSchedule):
        text_cond = TextSchedule.of(text_cond[:1] if text_cond.ndim == 3 else text_cond)
    return rebuild_context(policy, text_cond, prefix_latents)


def replay_pivot_chunk(
    policy: StreamingVideoPolicy,
    text_cond: torch.Tensor | TextSchedule,
    prefix_latents: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    prefix_cache: KVCache | None = None,
) -> torch.Tensor:
    """x0 predictions ``[B, f, C, H, W]`` for anchors ``x_t [B, f, C, H, W]`` at ``timesteps [B]``.

    ``text_cond``: ``[1, S, D]`` (or ``[S, D]``) shared by the batch, or the group's ``TextSchedule``.
    Pass ``prefix_cache`` (from ``rebuild_prefix_cache``) to reuse one rebuilt context across several
    calls on the same group.
    """
    schedule = text_cond
    if isinstance(text_cond, TextSchedule):  # the pivot chunk's own prompt
        text_cond = text_cond.at(prefix_latents.shape[0] // policy.frames_per_chunk)
    if text_cond.ndim == 2:
        text_cond = text_cond[None]
    text_cond = text_cond.to(policy.device, policy.dtype)
    b, f = x_t.shape[:2]
    if f != policy.frames_per_chunk or tuple(x_t.shape[2:]) != policy.latent_shape:
        raise ValueError(f"x_t must be [B, {policy.frames_per_chunk}, *{policy.latent_shape}], got {tuple(x_t.shape)}")
    timesteps = torch.as_tensor(timesteps, device=policy.device).reshape(-1)
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(b)
    if timesteps.shape != (b,):
        raise ValueError(f"timesteps must be [B={b}], got {tuple(timesteps.shape)}")
    if prefix_cache is None:
        prefix_cache = rebuild_prefix_cache(policy, schedule, prefix_latents)
    cache = prefix_cache.expand(b, copy=False)  # read-only context: broadcast views, no copy
    cache.clear_text()  # recomputed with gradient
    x_t = x_t.to(policy.device, policy.dtype)
    flow = policy.transformer.forward_chunk(
        x_t, timesteps[:, None].expand(b, f), cache, prefix_latents.shape[0], text_cond, write_cache=False
    )
    return x0_from_flow(x_t, flow, policy.sampler.sigmas(timesteps))
