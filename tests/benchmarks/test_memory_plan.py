"""The memory planner against memory measured on the CPU, at the real width (1536) with 2 blocks.

The planner simulates the learner's replay on meta tensors with the adapter in the base dtype (meta
has no autocast); the measurement runs the learner's real policy on the CPU: random bf16 weights, the
float32 adapter the learner attaches (computed in bf16), micro-batches of replays with a backward
each, then an AdamW step. Bytes are counted by `TensorMemory` on real storages.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory_plan import lora_parameters, meta_policy, replay_memory
from benchmarks.tensor_memory import TensorMemory
from policy.factory import add_adapter
from policy.pivot_replay import rebuild_prefix_cache, replay_pivot_chunk
from policy.presets import WAN21_T2V_1_3B, PolicyPreset
from policy.settings import LoraSettings

TEXT_TOKENS = 16
PRESET = PolicyPreset(name="real-width-2-blocks", transformer={**WAN21_T2V_1_3B, "num_layers": 2},
                      frames_per_chunk=3, num_chunks=2, latent_shape=(16, 8, 16))
LORA = LoraSettings(rank=64, alpha=128)


@pytest.fixture(scope="module")
def cpu_policy():
    torch.manual_seed(0)
    policy = meta_policy(PRESET, torch.bfloat16, device=torch.device("cpu"))  # random init, base only
    add_adapter(policy, "on_policy", LORA)  # the learner's own: float32 adapter computed in bf16
    with torch.no_grad():  # a nonzero B, so that every adapter tensor gets a gradient
        for p in lora_parameters(policy.transformer)[1::2]:
            p.normal_(0, 1e-3)
    return policy


def measured_update(policy, checkpointing: bool, samples: int, micro: int) -> dict[str, int]:
    if checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    else:
        policy.transformer.disable_gradient_checkpointing()
    lora = lora_parameters(policy.transformer)
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    for p in lora:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(lora, lr=1e-5)
    pivot, f = PRESET.num_chunks - 1, PRESET.frames_per_chunk
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(pivot * f, *PRESET.latent_shape, generator=gen)
    x_t = torch.randn(samples, f, *PRESET.latent_shape, generator=gen)
    mem = TensorMemory()
    with mem:
        text = torch.randn(1, TEXT_TOKENS, WAN21_T2V_1_3B["text_dim"], generator=gen, dtype=torch.bfloat16)
        cache = rebuild_prefix_cache(policy, text, prefix)
        cache_bytes = mem.live
        for lo in range(0, samples, micro):
            x0 = replay_pivot_chunk(policy, text, prefix, x_t[lo : lo + micro], torch.full((micro,), 625.0), prefix_cache=cache)
            x0.float().square().mean().backward()
            del x0
        activation_peak = mem.peak - cache_bytes
        before_step = mem.live
        optimizer.step()
        optimizer_state = mem.live - before_step
    assert all(float(p.grad.abs().sum()) > 0 for p in lora), "an adapter tensor got no gradient"
    return {"prefix_cache": cache_bytes, "activation_peak": activation_peak, "optimizer_state": optimizer_state,
            "lora_bytes": sum(p.numel() * 4 for p in lora)}


@pytest.mark.parametrize("checkpointing, micro", [(True, 2), (False, 1)])
def test_learner_plan_within_15_percent_of_cpu_measurement(cpu_policy, checkpointing, micro):
    measured = measured_update(cpu_policy, checkpointing, samples=2, micro=micro)

    policy = meta_policy(PRESET, torch.bfloat16, LORA, trainable=True, checkpointing=checkpointing)
    for p in lora_parameters(policy.transformer):
        p.grad = torch.zeros_like(p)
    planned = replay_memory(policy, micro, PRESET.num_chunks - 1, TEXT_TOKENS)

    assert planned["prefix_cache"] == measured["prefix_cache"]
    assert planned["forward_backward_peak"] == pytest.approx(measured["activation_peak"], rel=0.15)
    # Adam's two float32 moments (plus a step counter a tensor) are the planner's adam_state_fp32.
    assert 2 * measured["lora_bytes"] == pytest.approx(measured["optimizer_state"], rel=0.01)


def test_checkpointing_and_micro_batches_shrink_the_plan():
    """Independent of the simulation: checkpointing keeps ~1 block input of the ~dozens of tensors a
    block saves, and halving the micro-batch halves the saved activations."""
    full = meta_policy(PRESET, torch.bfloat16, LORA, trainable=True)
    ckpt = meta_policy(PRESET, torch.bfloat16, LORA, trainable=True, checkpointing=True)
    saved = {(c, m): replay_memory(p, m, 1, TEXT_TOKENS)["saved_activations"] for c, p in ((False, full), (True, ckpt)) for m in (2, 4)}
    assert saved[(True, 4)] < saved[(False, 4)] / 5
    assert saved[(False, 4)] == pytest.approx(2 * saved[(False, 2)], rel=0.1)

