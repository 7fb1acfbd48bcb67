"""Dtypes at real scale: a bf16 model gets a bf16 KV cache from every constructor path; a float32 adapter on
a bf16 base computes exactly what the workers' bf16 adapter computes, without saving float32 activations;
the replay's shared-prefix attention equals attending to a per-sample copy of the prefix."""

from __future__ import annotations

import copy

import pytest
import torch

from policy.attention import scaled_dot_product, shared_context_attention
from policy.kv_cache import KVCache
from policy.lora import attach_adapter, export_adapter_state, import_adapter_state
from policy.lora_precision import keep_adapter_in_float32
from policy.pivot_replay import rebuild_prefix_cache, replay_pivot_chunk
from policy.presets import build_policy
from policy.sampler import x0_from_flow
from policy.transformer_causal_wan import CausalWanTransformer3DModel
from tests.policy.conftest import make_policy


def _bf16_models(tmp_path):
    """The ways a bf16 causal transformer comes about, each keeping (or not) the fp32 modules."""
    policy = build_policy("tiny", dtype=torch.bfloat16)
    model = policy.transformer
    model.save_pretrained(tmp_path / "t")
    return {
        "build_policy": model,
        "cast": copy.deepcopy(model).cast(torch.float32).cast(torch.bfloat16),
        "to": copy.deepcopy(model).to(torch.bfloat16),
        "from_pretrained": CausalWanTransformer3DModel.from_pretrained(tmp_path / "t", torch_dtype=torch.bfloat16),
    }, policy


def test_a_bf16_model_gets_a_bf16_cache_from_every_constructor_path(tmp_path):
    models, policy = _bf16_models(tmp_path)
    h, w = policy.latent_shape[1:]
    assert models["build_policy"].scale_shift_table.dtype == torch.float32  # the parameter that misled for_model
    text = torch.randn(1, 6, policy.transformer.config.text_dim, dtype=torch.bfloat16)
    x = torch.randn(2, policy.frames_per_chunk, *policy.latent_shape, dtype=torch.bfloat16)
    for how, model in models.items():
        tpf = model.tokens_per_frame(h, w)
        caches = {
            "for_model": KVCache.for_model(model, 2, 9, tpf),
            "new_kv_cache": model.new_kv_cache(2, 9, h, w),
            "expand": model.new_kv_cache(1, 9, h, w).expand(2),
            "expand_view": model.new_kv_cache(1, 9, h, w).expand(2, copy=False),
            "clone": model.new_kv_cache(2, 9, h, w).clone(),
        }
        for name, cache in caches.items():
            assert cache.dtype == torch.bfloat16 and cache.keys[0].dtype == torch.bfloat16, (how, name)
        with torch.no_grad():
            out = model.forward_chunk(x, torch.full((2,), 500.0), caches["for_model"], 0, text)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all(), how
    assert policy.new_cache(2).dtype == torch.bfloat16
    assert KVCache.for_model(models["cast"], 1, 3, 4, dtype=torch.float32).dtype == torch.float32  # explicit wins


def _lora_policies():
    """A bf16 learner policy (float32 adapter) and a worker copy holding the same adapter in bf16."""
    learner = build_policy("tiny", dtype=torch.bfloat16)
    worker = copy.deepcopy(learner)
    attach_adapter(learner.transformer, "a", rank=4, alpha=8)
    keep_adapter_in_float32(learner.transformer, "a")
    attach_adapter(worker.transformer, "a", rank=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    import_adapter_state(learner.transformer, "a", {
        k: torch.randn(v.shape, generator=g) * 0.1 for k, v in export_adapter_state(learner.transformer, "a").items()
    })
    import_adapter_state(worker.transformer, "a", export_adapter_state(learner.transformer, "a", dtype=torch.bfloat16))
    return learner, worker


def test_float32_adapter_on_a_bf16_base_computes_what_the_workers_bf16_adapter_does():
    learner, worker = _lora_policies()
    trainable = {n: p for n, p in learner.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert {p.dtype for n, p in worker.transformer.named_parameters() if "lora_" in n} == {torch.bfloat16}
    text = torch.randn(1, 6, learner.transformer.config.text_dim, dtype=torch.bfloat16)
    x = torch.randn(2, learner.frames_per_chunk, *learner.latent_shape)
    outs = [p.transformer.forward_chunk(x, torch.full((2,), 500.0), p.new_cache(2), 0, text) for p in (learner, worker)]
    assert outs[0].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])
    outs[0].float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    assert any(float(p.grad.abs().sum()) > 0 for n, p in trainable.items() if "lora_A" in n)


def test_lora_layers_save_no_float32_activation():
    learner, _ = _lora_policies()
    layer = learner.transformer.blocks[0].ffn.net[2]  # the widest input of a block
    x = torch.randn(2, 24, layer.in_features, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    activations = [t for t in saved if t.numel() >= x.numel()]
    assert activations and all(t.dtype == torch.bfloat16 for t in activations)


def test_small_adam_steps_move_a_float32_adapter_and_round_away_on_a_bf16_one():
    learner, worker = _lora_policies()

    def moved(model) -> float:
        params = [p for n, p in model.named_parameters() if "lora_A" in n]
        for p in params:
            p.requires_grad_(True)
            p.grad = torch.ones_like(p)
        before = [p.detach().clone() for p in params]
        torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0).step()
        return sum(int((p != b).sum()) for p, b in zip(params, before)) / sum(p.numel() for p in params)

    assert moved(learner.transformer) == 1.0
    assert moved(worker.transformer) < 0.2


@pytest.mark.parametrize("b,ctx", [(3, 7), (5, 3)])  # shared keys; too many masked keys: copies
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_context_attention_equals_attending_to_per_sample_copies(dtype, b, ctx):
    g = torch.Generator().manual_seed(0)
    s, heads, dim = 5, 2, 8
    q, k, v = (torch.randn(b, s, heads, dim, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    ctx_k, ctx_v = (torch.randn(1, ctx, heads, dim, generator=g, dtype=dtype) for _ in range(2))
    shared = shared_context_attention(q, k, v, ctx_k, ctx_v)
    copied = scaled_dot_product(q, torch.cat([ctx_k.repeat(b, 1, 1, 1), k], 1), torch.cat([ctx_v.repeat(b, 1, 1, 1), v], 1))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(shared, copied, **tol)
    weights = torch.randn(shared.shape, generator=g, dtype=dtype)
    grads_shared = torch.autograd.grad((shared * weights).sum(), (q, k, v))
    grads_copied = torch.autograd.grad((copied * weights).sum(), (q, k, v))
    for a, c in zip(grads_shared, grads_copied):
        torch.testing.assert_close(a, c, **tol)


@pytest.mark.parametrize("name,pivot", [("tiny", 2), ("tiny-window", 4)])
def test_replay_over_the_shared_prefix_equals_replay_over_copied_prefixes(name, pivot):
    """The replay's broadcast prefix cache (shared attention) against the same cache copied per sample (the
    concatenating path), values and adapter gradients; the windowed preset reads non-contiguous slots."""
    policy = make_policy(name)
    attach_adapter(policy.transformer, "a", rank=4, alpha=8)
    g = torch.Generator().manual_seed(2)
    import_adapter_state(policy.transformer, "a", {
        k: torch.randn(v.shape, generator=g) * 0.1 for k, v in export_adapter_state(policy.transformer, "a").items()
    })
    f = policy.frames_per_chunk
    text = policy.text_conditioning(["a blue square"])
    prefix = torch.randn(pivot * f, *policy.latent_shape, generator=g)
    x_t = torch.randn(3, f, *policy.latent_shape, generator=g)
    t = torch.tensor([900.0, 500.0, 250.0])
    cache = rebuild_prefix_cache(policy, text, prefix)
    params = [p for p in policy.transformer.parameters() if p.requires_grad]

    shared = replay_pivot_chunk(policy, text, prefix, x_t, t, prefix_cache=cache)
    copies = cache.expand(3, copy=True)
    copies.clear_text()
    flow = policy.transformer.forward_chunk(x_t, t[:, None].expand(3, f), copies, pivot * f, text, write_cache=False)
    copied = x0_from_flow(x_t, flow, policy.sampler.sigmas(t))
    torch.testing.assert_close(shared, copied, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(out.square().mean(), params) for out in (shared, copied)]
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-7)


def _bf16_replay(policy, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    f = policy.frames_per_chunk
    text = torch.randn(1, 6, policy.transformer.config.text_dim, generator=g)
    prefix = torch.randn(2 * f, *policy.latent_shape, generator=g)
    cache = rebuild_prefix_cache(policy, text, prefix)
    x_t = torch.randn(2, f, *policy.latent_shape, generator=g)
    return lambda: replay_pivot_chunk(policy, text, prefix, x_t, torch.tensor([900.0, 250.0]), prefix_cache=cache)


def test_a_bf16_replay_saves_no_float32_activation_and_keeps_its_gradient(monkeypatch):
    learner, _ = _lora_policies()
    model = learner.transformer
    replay = _bf16_replay(learner)
    tokens = 2 * learner.frames_per_chunk * model.tokens_per_frame(*learner.latent_shape[1:])
    activation = tokens * model.config.num_attention_heads * model.config.attention_head_dim
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = replay()
    wide = [t for t in saved if t.numel() >= activation and t.dtype in (torch.float32, torch.float64)]
    assert not wide, [(t.dtype, tuple(t.shape)) for t in wide]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.float().square().mean(), params)
    # The same replay upcasting in place (what Wan's code does): the same values and gradients, bit for bit.
    monkeypatch.setattr("policy.attention.upcast_apply", lambda fn, x: fn(x.float()))
    monkeypatch.setattr("policy.transformer_causal_wan.upcast_apply", lambda fn, x: fn(x.float()))
    monkeypatch.setattr("policy.upcast_norm.upcast_apply", lambda fn, x: fn(x.float()))
    plain = replay()
    assert torch.equal(plain, out)
    for a, b in zip(grads, torch.autograd.grad(plain.float().square().mean(), params)):
        assert torch.equal(a, b)
