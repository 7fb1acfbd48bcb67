"""Streaming generation and the forked group rollout (AR-CoPO, SDE-GRPO).

``generate`` runs one video chunk by chunk. ``rollout_group`` generates the chunks before the pivot
once at batch 1, repeats that prefix KV cache along the batch (no recomputation), and runs the G
branches batched from the pivot to the end, recording the pivot chunk's trajectory (each step's input
``x_t``, timestep and x0 prediction) and the clean prefix latents the learner needs to rebuild the
context. Forward passes are counted by the transformer itself: one per video per chunk forward.

Both take one prompt or a ``TextSchedule`` (prompts per chunk, LongLive's KV re-cache at each switch,
``policy.recache``). A windowed policy forked past its first window also re-caches at the pivot, so
the learner rebuilds the branches' context from the sink and the window alone.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from policy.kv_cache import KVCache
from policy.noise_plan import GroupNoisePlan, NoisePlan
from policy.pipeline import StreamingVideoPolicy
from policy.recache import TextSchedule, recache, window_recache_at_pivot
from policy.sampler import renoise, x0_from_flow


@dataclass
class VideoRollout:
    latents: torch.Tensor  # [F, C, H, W]
    forward_passes: int


@dataclass
class GroupRollout:
    latents: torch.Tensor  # [G, F, C, H, W]
    pivot: int  # 0-based chunk index
    prefix_latents: torch.Tensor  # [pivot * f, C, H, W], clean, shared by all branches
    pivot_inputs: torch.Tensor  # [G, T, f, C, H, W], x_t fed at each step of the pivot chunk
    timesteps: torch.Tensor  # [T] float32, model units
    pivot_x0: torch.Tensor  # [G, T, f, C, H, W], x0 predicted at each step of the pivot chunk
    forward_passes: int  # counted: one per video per chunk forward
    group_size: int
    sigma: float
    exploration: str  # "initial_noise" | "renoise"
    noise_seed: int
    num_chunks: int
    frames_per_chunk: int
    final_latents: torch.Tensor | None = None  # = latents when recorded for endpoint objectives
    recached_at_pivot: bool = False  # the prefix cache was re-cached before the pivot chunk (policy.recache)


def denoise_chunk(
    policy: StreamingVideoPolicy,
    cache: KVCache,
    text_cond: torch.Tensor,
    noise: torch.Tensor,
    start_frame: int,
    renoise_draw: Callable[[int], torch.Tensor],
    record: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Denoise one chunk in ``T`` steps, then write its clean x0 into ``cache`` (``T + 1`` forwards).

    ``noise``: the chunk's initial noise ``[B, f, C, H, W]``; ``renoise_draw(k)`` gives the draw used
    after step ``k``. ``T`` is the step list of chunk ``start_frame // f`` (chunk 0 may have its own). Returns the clean chunk and, with ``record``, the per-step inputs and x0
    predictions ``[B, T, f, C, H, W]``.
    """
    model = policy.transformer
    timesteps = policy.timesteps(chunk=start_frame // policy.frames_per_chunk)  # the chunk's own step list
    sigmas = policy.sampler.sigmas(timesteps)
    b, f = noise.shape[:2]
    x = noise.to(policy.device, policy.dtype)
    inputs, preds = [], []
    for k in range(len(timesteps)):
        flow = model.forward_chunk(x, timesteps[k].expand(b, f), cache, start_frame, text_cond)
        x0 = x0_from_flow(x, flow, sigmas[k])
        if record:
            inputs.append(x)
            preds.append(x0)
        if k + 1 < len(timesteps):
            draw = renoise_draw(k).to(policy.device, policy.dtype).expand_as(x0)
            x = renoise(x, x0, sigmas[k], sigmas[k + 1], draw, policy.sampler.eta)
    context_t = torch.full((b, f), policy.sampler.context_timestep, device=policy.device)
    model.forward_chunk(x0, context_t, cache, start_frame, text_cond)
    if not record:
        return x0, None, None
    return x0, torch.stack(inputs, 1), torch.stack(preds, 1)


def _check_plan(policy: StreamingVideoPolicy, plan: NoisePlan) -> None:
    expected = (policy.num_chunks, policy.frames_per_chunk, *policy.latent_shape)
    if tuple(plan.initial.shape) != expected:
        raise ValueError(f"noise plan initial {tuple(plan.initial.shape)} does not match the policy's {expected}")
    if plan.num_steps != policy.num_steps:
        raise ValueError(f"noise plan has {plan.num_steps} steps per chunk, the sampler {policy.num_steps}")


def _recache_before(
    policy: StreamingVideoPolicy,
    cache: KVCache,
    texts: TextSchedule,
    chunk: int,
    done: Callable[[], torch.Tensor],
    extra: bool,
) -> bool:
    """LongLive's re-cache before ``chunk`` at a prompt switch (or when ``extra``); ``done()``: the clean
    latents ``[B, chunk * f, C, H, W]`` generated so far. Returns whether it ran."""
    if chunk == 0 or not (extra or texts.switches_at(chunk)):
        return False
    recache(policy, cache, done(), texts.at(chunk))
    return True


def _schedule(policy: StreamingVideoPolicy, text_cond: torch.Tensor | TextSchedule) -> TextSchedule:
    texts = TextSchedule.of(text_cond)
    if texts.segments[-1][0] >= policy.num_chunks:
        raise ValueError(f"text schedule switches at chunk {texts.segments[-1][0]}, the video has {policy.num_chunks}")
    return texts.to(policy.device, policy.dtype)


@torch.no_grad()
def generate(
    policy: StreamingVideoPolicy,
    text_cond: torch.Tensor | TextSchedule,
    plan: NoisePlan,
    recache_at: Collection[int] = (),
) -> VideoRollout:
    """One video from one noise plan: latents ``[F, C, H, W]``.

    ``text_cond``: one prompt, or a ``TextSchedule`` that switches prompts at chunk boundaries (with
    LongLive's re-cache). ``recache_at``: chunks before which to re-cache with an unchanged prompt (what
    a group forked past the first window does at its pivot).
    """
    _check_plan(policy, plan)
    texts = _schedule(policy, text_cond)
    before = policy.transformer.sample_forwards
    cache = policy.new_cache(1)
    f = policy.frames_per_chunk
    chunks = []
    for c in range(policy.num_chunks):
        _recache_before(policy, cache, texts, c, lambda: torch.cat(chunks)[None], c in recache_at)
        draw = lambda k, c=c: plan.renoise[c, k][None]  # noqa: E731
        x0, _, _ = denoise_chunk(policy, cache, texts.at(c), plan.initial[c][None], c * f, draw)
        chunks.append(x0[0])
    return VideoRollout(torch.cat(chunks), policy.transformer.sample_forwards - before)


@torch.no_grad()
def rollout_prefix(
    policy: StreamingVideoPolicy, texts: TextSchedule, plan: NoisePlan, pivot: int
) -> tuple[torch.Tensor, KVCache, bool]:
    """The shared prefix of a group forked at ``pivot``: clean latents ``[pivot * f, C, H, W]``, the
    batch-1 cache the branches start from, and whether it was re-cached at the pivot."""
    f = policy.frames_per_chunk
    cache = policy.new_cache(1)
    prefix: list[torch.Tensor] = []
    done = lambda: torch.cat(prefix)[None]  # noqa: E731
    for c in range(pivot):
        _recache_before(policy, cache, texts, c, done, False)
        draw = lambda k, c=c: plan.renoise[c, k][None]  # noqa: E731
        x0, _, _ = denoise_chunk(policy, cache, texts.at(c), plan.initial[c][None], c * f, draw)
        prefix.append(x0[0])
    recached = _recache_before(policy, cache, texts, pivot, done, window_recache_at_pivot(policy, pivot))
    latents = torch.cat(prefix) if prefix else torch.zeros((0, *policy.latent_shape), device=policy.device)
    return latents, cache, recached


def _rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Select branch rows of a per-branch draw; shared draws (batch 1) broadcast as they are."""
    return t if t.shape[0] == 1 else t[idx]


@torch.no_grad()
def rollout_group(
    policy: StreamingVideoPolicy,
    text_cond: torch.Tensor | TextSchedule,
    group_plan: GroupNoisePlan,
    record_final_latents: bool = True,
    branch_batch_size: int | None = None,
) -> GroupRollout:
    """Forked group: shared prefix once, then G branches batched (``branch_batch_size`` per call).

    ``text_cond``: one prompt or a ``TextSchedule`` (prompt switches re-cache, shared ones once in the
    prefix). A windowed policy forked past its first window re-caches at the pivot (``rollout_prefix``).
    """
    _check_plan(policy, group_plan.base)
    texts = _schedule(policy, text_cond)
    model = policy.transformer
    before = model.sample_forwards
    f, pivot, g = policy.frames_per_chunk, group_plan.pivot, group_plan.group_size
    base = group_plan.base
    if group_plan.exploration == "renoise" and policy.sampler.chunk_num_steps(pivot) < 2:
        raise ValueError(
            f"re-noise exploration (SDE-GRPO) needs >= 2 steps in the pivot chunk; chunk {pivot} has "
            f"{policy.sampler.step_list(pivot)}: pick a pivot with more steps (e.g. chunk 0 of a Causal-Forcing++ preset)"
        )

    prefix_latents, prefix_cache, recached = rollout_prefix(policy, texts, base, pivot)

    step = branch_batch_size or g
    if step < 1:
        raise ValueError(f"branch_batch_size must be >= 1, got {branch_batch_size}")
    branch_latents, pivot_inputs, pivot_x0 = [], [], []
    for lo in range(0, g, step):
        idx = list(range(lo, min(lo + step, g)))
        cache = prefix_cache.expand(len(idx))
        chunks: list[torch.Tensor] = []
        done = lambda: torch.cat([prefix_latents[None].expand(len(idx), -1, -1, -1, -1), *chunks], dim=1)  # noqa: E731
        for c in range(pivot, policy.num_chunks):
            if c > pivot:
                _recache_before(policy, cache, texts, c, done, False)
            noise = _rows(group_plan.initial_noise(c), idx).expand(len(idx), -1, -1, -1, -1)
            x0, inputs, preds = denoise_chunk(
                policy,
                cache,
                texts.at(c),
                noise,
                c * f,
                lambda k, c=c: _rows(group_plan.renoise_draw(c, k), idx),
                record=c == pivot,
            )
            if c == pivot:
                pivot_inputs.append(inputs)
                pivot_x0.append(preds)
            chunks.append(x0)
        branch_latents.append(torch.cat(chunks, dim=1))
        del cache  # before the next batch's cache is expanded: two batches' caches never live at once

    latents = torch.cat([prefix_latents[None].expand(g, -1, -1, -1, -1), torch.cat(branch_latents)], dim=1)
    return GroupRollout(
        latents=latents,
        pivot=pivot,
        prefix_latents=prefix_latents,
        pivot_inputs=torch.cat(pivot_inputs),
        timesteps=policy.timesteps(chunk=pivot),
        pivot_x0=torch.cat(pivot_x0),
        forward_passes=model.sample_forwards - before,
        group_size=g,
        sigma=group_plan.sigma,
        exploration=group_plan.exploration,
        noise_seed=group_plan.seed,
        num_chunks=policy.num_chunks,
        frames_per_chunk=f,
        final_latents=latents if record_final_latents else None,
        recached_at_pivot=recached,
    )
