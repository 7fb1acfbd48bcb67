"""Prompt schedules and LongLive's KV re-cache.

A ``TextSchedule`` gives each chunk its text conditioning: ``(first chunk, [1, S, D])`` segments, the
first starting at chunk 0. At a chunk boundary where the prompt changes, LongLive (v1 interactive
inference, ``global_sink: true`` as its configs ship) re-caches before generating on:

- the ``n = min(W, s)`` clean frames before the switch frame ``s`` run once more, at the context
  timestep, under the new prompt (``W``: the local window; every earlier frame without one);
- ``s <= W`` (nothing evicted yet): all ``s`` cached frames are rewritten, each attending to all of
  them, unmasked;
- ``s > W``: the sink frames keep their K/V; the ``n`` frames attend, unmasked, to the sink's K/V and
  to the new K/V of the last ``W - S`` frames, which replace the ring. The first ``S`` frames of the
  re-run are inputs only: their slots belong to the sink;
- the cross-attention text K/V become the new prompt's.

The same re-cache with an unchanged prompt is what makes a long-video pivot cheap to replay: after
it, the cache depends on the sink and the last ``W`` frames only (``rebuild_window_cache``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from policy.attention import scaled_dot_product
from policy.kv_cache import KVCache
from policy.pipeline import StreamingVideoPolicy

PromptSchedule = Sequence[tuple[int, str]]


def check_prompt_schedule(schedule: PromptSchedule, num_chunks: int | None = None) -> list[tuple[int, str]]:
    """``[(first chunk, prompt), ...]``: the first at chunk 0, chunks strictly increasing (and < ``num_chunks``)."""
    out = [(int(c), str(p)) for c, p in schedule]
    if not out or out[0][0] != 0:
        raise ValueError(f"prompt_schedule must start at chunk 0, got {[c for c, _ in out]}")
    chunks = [c for c, _ in out]
    if any(a >= b for a, b in zip(chunks, chunks[1:])):
        raise ValueError(f"prompt_schedule chunks must be strictly increasing, got {chunks}")
    if num_chunks is not None and chunks[-1] >= num_chunks:
        raise ValueError(f"prompt_schedule switches at chunk {chunks[-1]}, the video has {num_chunks} chunks")
    return out


@dataclass(frozen=True)
class TextSchedule:
    """Text conditioning per chunk: ``segments[i] = (first chunk, [1, S, D])``, the first at chunk 0."""

    segments: tuple[tuple[int, torch.Tensor], ...]

    def __post_init__(self) -> None:
        check_prompt_schedule([(c, "") for c, _ in self.segments])

    @classmethod
    def of(cls, text: torch.Tensor | TextSchedule) -> TextSchedule:
        """One prompt (``[S, D]`` or ``[1, S, D]``) for the whole video, or a schedule as it is."""
        if isinstance(text, TextSchedule):
            return text
        if text.ndim == 2:
            text = text[None]
        if text.ndim != 3 or text.shape[0] != 1:
            raise ValueError(f"text_cond must be [S, D] or [1, S, D] (one prompt), got {tuple(text.shape)}")
        return cls(((0, text),))

    def at(self, chunk: int) -> torch.Tensor:
        return [t for c, t in self.segments if c <= chunk][-1]

    def switches_at(self, chunk: int) -> bool:
        return chunk > 0 and any(c == chunk for c, _ in self.segments)

    def to(self, device, dtype) -> TextSchedule:
        return TextSchedule(tuple((c, t.to(device, dtype)) for c, t in self.segments))


def encode_schedule(policy: StreamingVideoPolicy, schedule: PromptSchedule) -> TextSchedule:
    """Each prompt of ``schedule`` through the policy's (cached) text encoder."""
    schedule = check_prompt_schedule(schedule, policy.num_chunks)
    conds = policy.text_conditioning([p for _, p in schedule])
    return TextSchedule(tuple((c, conds[i : i + 1]) for i, (c, _) in enumerate(schedule)))


def window_recache_at_pivot(policy: StreamingVideoPolicy, pivot: int) -> bool:
    """Whether a group forked at ``pivot`` re-caches there: a windowed policy whose pivot lies past the
    first window (frames already evicted), unless ``policy.recache_at_pivot`` is off."""
    w = policy.local_window
    return policy.recache_at_pivot and w is not None and pivot * policy.frames_per_chunk > w


class _RecacheView:
    """What ``forward_chunk`` sees as its cache during a re-cache: writes the kept frames into ``cache``,
    hands every query the sink's old K/V (when protected) plus the re-run frames' new K/V, unmasked."""

    def __init__(self, cache: KVCache, start: int, end: int) -> None:
        if cache.read_only:
            raise RuntimeError("cannot re-cache a cache of broadcast views (expand(copy=False)): expand with a copy")
        self.cache, self.batch_size = cache, cache.batch_size
        self.text_keys = self.text_values = None
        tpf = cache.tokens_per_frame
        sink = cache.sink_frames if cache.local_window is not None and start > 0 else 0
        if sink and cache.slot_frames[:sink] != list(range(sink)):
            raise RuntimeError(f"the cache's sink slots hold frames {cache.slot_frames[:sink]}, not 0..{sink - 1}")
        self.sink_tokens = sink * tpf
        self.kept = list(range(start + sink, end))
        self.kept_index = torch.arange(sink * tpf, (end - start) * tpf, device=cache.device)
        self.slots = [cache.slot_of(f) for f in self.kept]
        if len(set(self.slots)) != len(self.slots):
            raise ValueError(f"re-cache of frames {start}..{end - 1} does not fit the cache's {cache.capacity} slots")

    def has_text(self) -> bool:
        return self.text_keys is not None

    def set_text(self, keys, values) -> None:
        self.text_keys, self.text_values = keys, values

    def plan_chunk(self, start_frame: int, num_frames: int, write: bool) -> None:
        for frame, slot in zip(self.kept, self.slots):
            self.cache.slot_frames[slot] = frame

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor, chunk: None) -> tuple[torch.Tensor, torch.Tensor]:
        cache, tpf = self.cache, self.cache.tokens_per_frame
        k_new, v_new = k.index_select(1, self.kept_index), v.index_select(1, self.kept_index)
        for i, slot in enumerate(self.slots):
            cache.keys[layer][:, slot * tpf : (slot + 1) * tpf] = k_new[:, i * tpf : (i + 1) * tpf]
            cache.values[layer][:, slot * tpf : (slot + 1) * tpf] = v_new[:, i * tpf : (i + 1) * tpf]
        sink_k = cache.keys[layer][:, : self.sink_tokens]
        sink_v = cache.values[layer][:, : self.sink_tokens]
        return torch.cat([sink_k, k_new.to(sink_k.dtype)], 1), torch.cat([sink_v, v_new.to(sink_v.dtype)], 1)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: None) -> torch.Tensor:
        """``KVCache.attention``'s contract: the re-run frames attend, unmasked, to ``attend``'s keys."""
        return scaled_dot_product(q, *self.attend(layer, k, v, chunk))


@torch.no_grad()
def recache(policy: StreamingVideoPolicy, cache: KVCache, frames: torch.Tensor, text_cond: torch.Tensor) -> None:
    """Re-cache at switch frame ``s = frames.shape[1]`` under ``text_cond`` (module docstring).

    ``frames``: the clean latents ``[B, s, C, H, W]`` of frames ``0..s-1`` (only the last ``min(W, s)``
    are read). Writes ``cache`` in place, including its text K/V; one model forward per video.
    """
    s = frames.shape[1]
    if s == 0:
        cache.clear_text()
        return
    w = policy.local_window
    start = s - (s if w is None else min(w, s))
    view = _RecacheView(cache, start, s)
    t = torch.full((frames.shape[0], s - start), policy.sampler.context_timestep, device=policy.device)
    window = frames[:, start:].to(policy.device, policy.dtype)
    policy.transformer.forward_chunk(window, t, view, start, text_cond.to(policy.device, policy.dtype))
    cache.set_text(view.text_keys, view.text_values)


@torch.no_grad()
def rebuild_context(policy: StreamingVideoPolicy, texts: TextSchedule, prefix_latents: torch.Tensor) -> KVCache:
    """The batch-1 cache a group's branches started from, rebuilt from its clean prefix ``[P, C, H, W]``
    (``P = pivot * f``) exactly as ``rollout_prefix`` built it: chunk passes at the context timestep and
    re-caches at prompt switches. When the rollout re-cached at the pivot (``window_recache_at_pivot``),
    only the chunks and switches up to frame ``W`` (they alone write the sink's slots) and the pivot's
    re-cache run: the cost is bounded by the window, whatever the pivot's distance from the start.
    """
    f, w = policy.frames_per_chunk, policy.local_window
    if prefix_latents.ndim != 4 or tuple(prefix_latents.shape[1:]) != policy.latent_shape:
        raise ValueError(f"prefix_latents must be [pivot*f, *{policy.latent_shape}], got {tuple(prefix_latents.shape)}")
    if prefix_latents.shape[0] % f:
        raise ValueError(f"prefix of {prefix_latents.shape[0]} frames is not a whole number of {f}-frame chunks")
    pivot = prefix_latents.shape[0] // f
    bounded = window_recache_at_pivot(policy, pivot)
    texts = texts.to(policy.device, policy.dtype)
    prefix = prefix_latents.to(policy.device, policy.dtype)[None]
    cache = policy.new_cache(1)
    for c in range(pivot):
        if bounded and c * f > w:
            break
        if texts.switches_at(c):
            recache(policy, cache, prefix[:, : c * f], texts.at(c))
        if bounded and c * f == w:
            break  # the sink is final: a chunk from frame W on writes only ring slots, which the pivot rewrites
        t = torch.full((1, f), policy.sampler.context_timestep, device=policy.device)
        policy.transformer.forward_chunk(prefix[:, c * f : (c + 1) * f], t, cache, c * f, texts.at(c))
    if bounded or texts.switches_at(pivot):
        recache(policy, cache, prefix, texts.at(pivot))
    return cache
