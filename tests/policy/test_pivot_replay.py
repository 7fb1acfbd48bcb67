"""Pivot-chunk replay: rebuilt context reproduces the rollout's x0, and gradients reach the adapters."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from policy.noise_plan import NoisePlan
from policy.pivot_replay import rebuild_prefix_cache, replay_pivot_chunk
from policy.rollout import rollout_group
from tests.policy.conftest import make_policy

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def group_for(policy, pivot, g=3):
    plan = NoisePlan.from_seed(5, policy.num_chunks, policy.frames_per_chunk, policy.latent_shape, policy.num_steps)
    text = policy.text_conditioning(["an orange circle grows"])
    return text, rollout_group(policy, text, plan.fork(pivot=pivot, group_size=g, sigma=0.5))


def flat_anchors(group):
    """Every (branch, step) of the pivot trajectory as one batch of anchors."""
    g, t = group.pivot_inputs.shape[:2]
    return group.pivot_inputs.flatten(0, 1), group.timesteps.repeat(g), group.pivot_x0.flatten(0, 1)


@pytest.mark.parametrize("name,pivot", [("tiny", 1), ("tiny", 0), ("tiny-window", 4)])
def test_replay_reproduces_recorded_x0(name, pivot):
    policy = make_policy(name)
    text, group = group_for(policy, pivot)
    x_t, t, x0_old = flat_anchors(group)
    with torch.no_grad():
        x0 = replay_pivot_chunk(policy, text, group.prefix_latents, x_t, t)
    assert x0.shape == x0_old.shape
    assert (x0 - x0_old).abs().max() < 1e-5


def test_replay_gradients_reach_every_adapter_and_only_them():
    policy = make_policy("tiny")
    text, group = group_for(policy, pivot=2)
    model = policy.transformer
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), adapter_name="policy")
    # A fresh LoRA (B = 0) leaves the function unchanged: replay still reproduces the old predictions.
    x_t, t, x0_old = flat_anchors(group)
    anchors = [0, 5, 11]
    calls_before = model.forward_calls
    cache = rebuild_prefix_cache(policy, text, group.prefix_latents)
    x0 = replay_pivot_chunk(policy, text, group.prefix_latents, x_t[anchors], t[anchors], prefix_cache=cache)
    assert model.forward_calls - calls_before == group.pivot + 1  # one t=0 pass per prefix chunk, then one
    assert (x0.detach() - x0_old[anchors]).abs().max() < 1e-5
    assert x0.requires_grad
    ((x0 - x0_old[anchors]) ** 2 + x0).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    for block in range(model.config.num_layers):
        for module in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                       "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"):
            g = grads[f"blocks.{block}.{module}.lora_B.policy.weight"]
            assert g is not None and g.abs().sum() > 0, module
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_replay_input_errors():
    policy = make_policy("tiny")
    text = policy.text_conditioning(["x"])
    prefix = torch.zeros(3, *policy.latent_shape)
    x_t = torch.zeros(2, 3, *policy.latent_shape)
    with pytest.raises(ValueError, match="timesteps"):
        replay_pivot_chunk(policy, text, prefix, x_t, torch.zeros(3))
    with pytest.raises(ValueError, match="x_t"):
        replay_pivot_chunk(policy, text, prefix, x_t[:, :2], torch.zeros(2))
    with pytest.raises(ValueError, match="whole number"):
        replay_pivot_chunk(policy, text, prefix[:2], x_t, torch.zeros(2))


def test_gradient_checkpointing_gives_the_same_gradients():
    policy = make_policy("tiny")
    text, group = group_for(policy, pivot=1, g=2)
    model = policy.transformer
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():  # a trained-looking adapter, so both LoRA factors get gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    x_t, t, _ = flat_anchors(group)
    cache = rebuild_prefix_cache(policy, text, group.prefix_latents)

    def grads():
        model.zero_grad(set_to_none=True)
        replay_pivot_chunk(policy, text, group.prefix_latents, x_t[:2], t[:2], prefix_cache=cache).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
    assert any(g.abs().sum() > 0 for n, g in plain.items() if "lora_A" in n)
