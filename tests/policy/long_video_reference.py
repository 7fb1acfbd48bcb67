"""An independent computation of windowed attention with explicit key sets, for the long-video tests.

It runs the transformer's own blocks on a set of frames whose self-attention keys are given
explicitly (earlier layers' K/V per layer, plus the frames' own), with no KV cache, no slot
bookkeeping and no visibility rule: the tests spell out, frame by frame, what LongLive attends to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy.attention import scaled_dot_product
from policy.causal_processors import SelfAttentionPlan, TextKV


def run_frames(model, latents, timesteps, start_frame, text, context=None, keep_from=0):
    """Flow of ``latents [1, n, C, H, W]`` at absolute frames ``start_frame..``; every query attends,
    unmasked, to ``context[layer]`` (``(k, v)`` tokens, or nothing) and to the own frames' K/V from
    frame index ``keep_from`` on. Returns ``(flow, [(k, v) of the kept frames per layer])``."""
    _, n, _, h, w = latents.shape
    _, ph, pw = model.config.patch_size
    tpf = (h // ph) * (w // pw)
    x = model._patchify(latents)
    temb, mod = model._time_embedding(torch.as_tensor(timesteps, dtype=torch.float32).expand(1, n))
    cos, sin = model._rope(torch.arange(start_frame, start_frame + n), h // ph, w // pw)
    text_keys, text_values = model.text_kv(text)
    kept = []

    @dataclass(frozen=True)
    class ExplicitKeys(SelfAttentionPlan):
        """Every query attends, unmasked, to the given context plus the own frames from `keep_from` on."""

        def attend(self, layer, q, k, v):
            k, v = k[:, keep_from * tpf :], v[:, keep_from * tpf :]
            kept.append((k, v))
            if context is not None:
                k, v = torch.cat([context[layer][0], k], 1), torch.cat([context[layer][1], v], 1)
            return scaled_dot_product(q, k, v)

    x = model._run_blocks(x, mod, TextKV(text_keys, text_values), ExplicitKeys(1, cos, sin))
    return model._head(x.unflatten(0, (1, n)), temb, (n, h // ph, w // pw)), kept


def join(*per_layer_kv):
    """Concatenate several per-layer ``(k, v)`` lists along the tokens."""
    return [(torch.cat([p[i][0] for p in per_layer_kv], 1), torch.cat([p[i][1] for p in per_layer_kv], 1))
            for i in range(len(per_layer_kv[0]))]


def frames_of(per_layer_kv, frames, tokens_per_frame):
    """The K/V of ``frames`` (indices into the list's frames) per layer."""
    idx = torch.cat([torch.arange(f * tokens_per_frame, (f + 1) * tokens_per_frame) for f in frames])
    return [(k[:, idx], v[:, idx]) for k, v in per_layer_kv]
