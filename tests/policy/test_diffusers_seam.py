"""The causal model stands on diffusers' Wan block: fails when the diffusers code it relies on changes.

``CausalWanTransformer3DModel`` runs diffusers' ``WanTransformerBlock.forward`` with its own attention
processors (``policy.causal_processors``) and norms (``policy.upcast_norm``), and keeps a copy of
diffusers' output head (``_head``). The fingerprints below pin the diffusers code those rely on; the
numerical tests check the result against diffusers' own bidirectional forward.
"""

from __future__ import annotations

import hashlib
import inspect

import diffusers
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformerBlock

from policy.causal_processors import CachedTextAttnProcessor, KVCacheSelfAttnProcessor
from policy.presets import TINY_TRANSFORMER
from policy.transformer_causal_wan import CausalWanTransformer3DModel
from policy.upcast_norm import RecomputedUpcastLayerNorm


def _head_source() -> str:
    source = inspect.getsource(WanTransformer3DModel.forward)
    return source[source.index("# 5. Output norm") :]


# What each pinned piece of diffusers' code is relied on for; re-check that, then update the hash.
PINNED = {
    "WanTransformerBlock.forward": (
        lambda: inspect.getsource(WanTransformerBlock.forward),
        "21c15441b009932c",
        "the block hands rotary_emb to attn1 and encoder_hidden_states to attn2 untouched (they carry "
        "SelfAttentionPlan / TextKV), a 3-D temb [rows, 6, dim] modulates per row (fold_frames), the "
        "norms are applied to hidden_states.float() of the block's dtype (upcast_norm), and the residual "
        "arithmetic matches the original Wan block",
    ),
    "WanTransformer3DModel.forward head": (
        _head_source,
        "260d688ed60078f4",
        "CausalWanTransformer3DModel._head is a per-frame copy of this head (norm_out, scale_shift_table, "
        "proj_out, unpatchify): port the change there",
    ),
    "WanAttention.forward": (
        lambda: inspect.getsource(WanAttention.forward),
        "babdd64efbbb28c8",
        "processors are called as (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)",
    ),
    "FP32LayerNorm.forward": (
        lambda: inspect.getsource(FP32LayerNorm.forward),
        "fb3a8812f75a9d83",
        "RecomputedUpcastLayerNorm calls it on the recomputed upcast and expects a float32 result",
    ),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_diffusers_code_the_causal_model_relies_on_is_unchanged(name):
    source, pinned, relied_on = PINNED[name]
    digest = hashlib.sha256(source().encode()).hexdigest()[:16]
    assert digest == pinned, (
        f"diffusers {diffusers.__version__} changed {name} (sha256 {digest}, pinned {pinned}). "
        f"The causal Wan model relies on it: {relied_on}. Re-check that, rerun tests/policy, then pin {digest}."
    )


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**TINY_TRANSFORMER).eval()
    reference = WanTransformer3DModel(**TINY_TRANSFORMER).eval()
    reference.load_state_dict(model.state_dict())
    return model, reference


def _inputs(batch=2, frames=4):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, frames, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, TINY_TRANSFORMER["text_dim"], generator=g)
    return x, text, torch.rand(batch, frames, generator=g) * 1000


def test_every_block_runs_diffusers_forward_with_the_cache_processors(models, monkeypatch):
    model, _ = models
    assert all(isinstance(p, (KVCacheSelfAttnProcessor, CachedTextAttnProcessor)) for p in model.attn_processors.values())
    assert all(type(getattr(b, n)) is RecomputedUpcastLayerNorm for b in model.blocks for n in ("norm1", "norm2", "norm3"))
    calls = []
    original = WanTransformerBlock.forward
    monkeypatch.setattr(WanTransformerBlock, "forward", lambda self, *a, **k: calls.append(self) or original(self, *a, **k))
    x, text, t = _inputs()
    with torch.no_grad():
        model.forward_chunk(x, t, model.new_kv_cache(2, 4, 8, 8), 0, text)
        model.forward_dense(x, t, text, 2)
    assert calls == list(model.blocks) * 2


def test_dense_forward_over_one_chunk_equals_diffusers_bidirectional_forward(models):
    """One chunk is bidirectional: forward_dense must equal diffusers' own forward (per-frame timesteps
    in diffusers' per-token form), and our model's inherited forward, whose processors then fall back to
    diffusers' WanAttnProcessor, must be diffusers' forward exactly."""
    model, reference = models
    x, text, t = _inputs()
    tpf = 16
    with torch.no_grad():
        expected = reference(x.transpose(1, 2), t.repeat_interleave(tpf, dim=1), text).sample.transpose(1, 2)
        got = model.forward_dense(x, t, text, frames_per_chunk=4)
        inherited = model(x.transpose(1, 2), t[:, 0], text).sample
        plain = reference(x.transpose(1, 2), t[:, 0], text).sample
    assert expected.abs().mean() > 0.1
    assert (got - expected).abs().max() < 1e-5
    assert torch.equal(inherited, plain)


def test_a_checkpointed_block_recomputes_with_its_own_calls_attention(models):
    """The per-call attention state rides in the block's arguments, so activation checkpointing recomputes
    each forward with its own mask/cache even after later forwards used another."""
    model, _ = models
    x, text, t = _inputs()

    def grads(checkpointing: bool):
        model.enable_gradient_checkpointing() if checkpointing else model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        causal = model.forward_dense(x, t, text, frames_per_chunk=1)
        model.forward_dense(x, t, text, frames_per_chunk=4)  # a later call with another mask, not backpropagated
        causal.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    try:
        with torch.enable_grad():
            plain, checkpointed = grads(False), grads(True)
    finally:
        model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
