"""Attention processors that put the KV cache into diffusers' Wan block (``WanAttention``'s processor seam).

``CausalWanTransformer3DModel`` runs diffusers' own ``WanTransformerBlock.forward`` and swaps only the
attention processors: ``attn1`` attends through a ``SelfAttentionPlan`` (the KV cache of a chunk forward,
or the block-causal mask of a dense forward), ``attn2`` through the text K/V computed once per video.

The per-call state reaches the processors through the block's own arguments, not through state held by
the processor: the plan travels in the block's ``rotary_emb`` slot (which the block hands to ``attn1``
untouched) and the text K/V in its ``encoder_hidden_states`` slot (handed to ``attn2``). So a block
recomputed by activation checkpointing in the backward sees exactly the state of its own forward call,
even after later calls. Given anything else (diffusers' own bidirectional ``forward``), a processor runs
diffusers' ``WanAttnProcessor`` unchanged.

The block receives its tokens folded as ``[B * F, tokens_per_frame, dim]`` (see ``fold_frames``), so
the processors unfold them to ``[B, F * tokens_per_frame, dim]`` to attend across frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from policy.attention import cross_attention, project_self_qkv, scaled_dot_product
from policy.kv_cache import ChunkSlots, KVCache


@dataclass(frozen=True)
class SelfAttentionPlan:
    """How one forward's self-attention attends: RoPE at absolute frames, and either the KV cache
    (``kv_cache`` + ``chunk``, a chunk forward) or a boolean ``mask`` (``None``: full attention)."""

    batch: int
    cos: torch.Tensor
    sin: torch.Tensor
    kv_cache: KVCache | None = None
    chunk: ChunkSlots | None = None
    mask: torch.Tensor | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kv_cache is not None:
            return self.kv_cache.attention(layer, q, k, v, self.chunk)
        return scaled_dot_product(q, k, v, self.mask)


@dataclass(frozen=True)
class TextKV:
    """Cross-attention keys/values of every layer, ``[B, S_text, heads, head_dim]`` each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class _LayerProcessor:
    """A processor of one layer; given no causal call state it is diffusers' ``WanAttnProcessor``."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.bidirectional = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        state = self.call_state(encoder_hidden_states, rotary_emb)
        if state is None:
            return self.bidirectional(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        return self.attend(attn, hidden_states, state)


class KVCacheSelfAttnProcessor(_LayerProcessor):
    """``attn1``: queries/keys RMS-normalised in float32 and rotated at absolute frames, attending as the
    call's ``SelfAttentionPlan`` says (keys are cached after RoPE)."""

    @staticmethod
    def call_state(encoder_hidden_states, rotary_emb) -> SelfAttentionPlan | None:
        return rotary_emb if isinstance(rotary_emb, SelfAttentionPlan) else None

    def attend(self, attn, hidden_states: torch.Tensor, plan: SelfAttentionPlan) -> torch.Tensor:
        x = hidden_states.reshape(plan.batch, -1, hidden_states.shape[-1])
        q, k, v = project_self_qkv(attn, x, plan.cos, plan.sin)
        out = attn.to_out[1](attn.to_out[0](plan.attend(self.layer, q, k, v)))
        return out.reshape(hidden_states.shape)


class CachedTextAttnProcessor(_LayerProcessor):
    """``attn2``: the queries attend to the call's precomputed ``TextKV``."""

    @staticmethod
    def call_state(encoder_hidden_states, rotary_emb) -> TextKV | None:
        return encoder_hidden_states if isinstance(encoder_hidden_states, TextKV) else None

    def attend(self, attn, hidden_states: torch.Tensor, text: TextKV) -> torch.Tensor:
        text_k, text_v = text.keys[self.layer], text.values[self.layer]
        x = hidden_states.reshape(text_k.shape[0], -1, hidden_states.shape[-1])
        return cross_attention(attn, x, text_k, text_v).reshape(hidden_states.shape)


def causal_processors(num_layers: int) -> dict[str, object]:
    """The processors for ``set_attn_processor``, keyed by diffusers' module names."""
    processors = {}
    for i in range(num_layers):
        processors[f"blocks.{i}.attn1.processor"] = KVCacheSelfAttnProcessor(i)
        processors[f"blocks.{i}.attn2.processor"] = CachedTextAttnProcessor(i)
    return processors


def fold_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, F * T, dim] -> [B * F, T, dim]`` (a view): each frame a row of its own.

    Why: Wan's block modulates with one ``[6, dim]`` vector per row (diffusers' Wan2.1 form, ``temb``
    ``[rows, 6, dim]``), and per-frame timesteps need one per frame. diffusers' other form, per-token
    ``temb [B, S, 6, dim]``, would materialise a float32 ``[B, S, 6, dim]`` per block (12x a bf16
    activation) and keep it for the backward; folded, the modulation stays ``[B * F, 1, dim]``. The
    norms, the modulation and the feed-forward act per token, so folding changes no value; only the
    attention processors, which mix tokens, unfold."""
    return x.unflatten(1, (frames, -1)).flatten(0, 1)
