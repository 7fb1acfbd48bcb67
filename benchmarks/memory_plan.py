"""Predicted peak accelerator memory of each role of a run, from the code's own tensor shapes.

    python -m benchmarks.memory_plan --config configs/self_forcing.yaml [--json]

Weights are counted from the real model classes built on the ``meta`` device (the preset's
transformer, the LoRA adapter ``policy.lora`` attaches, umT5-XXL, Wan's VAE, Qwen2-VL-2B). The
memory that depends on activations is simulated: the project's own code (``rollout_group``, the
codec's decode, ``rebuild_prefix_cache`` + ``replay_pivot_chunk`` and its backward) runs on meta
tensors of the real sizes while ``benchmarks.tensor_memory.TensorMemory`` follows every allocation
and free, with attention on the fused (flash) path a GPU takes. Reported parts are GiB; ``peak_gib``
is the sum of the resident parts plus the largest transient. The learner is planned at the last
pivot (the largest context) with one micro-batch's graph alive at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from benchmarks.tensor_memory import GIB, TensorMemory, flash_attention_on_meta
from controller.config import Config, load_config
from policy.factory import DTYPES
from policy.lora import DEFAULT_TARGETS, attach_adapter
from policy.lora_precision import keep_adapter_in_float32
from policy.noise_plan import NoisePlan
from policy.pipeline import StreamingVideoPolicy
from policy.pivot_replay import rebuild_prefix_cache, replay_pivot_chunk
from policy.presets import PolicyPreset, get_preset
from policy.rollout import rollout_group
from policy.settings import LoraSettings
from policy.text_encoder import WAN_TEXT_LENGTH
from policy.transformer_causal_wan import CausalWanTransformer3DModel

META = torch.device("meta")
# Published architectures of the models loaded from checkpoints (their config.json files).
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
QWEN2_VL_2B = dict(
    text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_chans=3,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
)
VIDEOALIGN_TEXT_TOKENS = 700  # the instruction + chat template + a prompt, in Qwen2 tokens
WAN_FRAME_STRIDE, WAN_FPS = 4, 16.0


@dataclass
class RolePlan:
    parts: dict[str, float] = field(default_factory=dict)  # GiB
    peak_gib: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"peak_gib": round(self.peak_gib, 2), "parts": {k: round(v, 3) for k, v in self.parts.items()},
                "notes": self.notes}


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def _linear_in_input_dtype(linear: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, linear.weight.to(x.dtype))

    return forward


def meta_policy(preset: PolicyPreset, dtype: torch.dtype, lora: LoraSettings | None = None, trainable: bool = False,
                checkpointing: bool = False, device: torch.device = META) -> StreamingVideoPolicy:
    """The preset's policy with uninitialised weights on ``device`` (meta: no memory), as a learner
    (``trainable``: float32 adapter computed in the base dtype) or a rollout worker (adapter in the
    base dtype) holds it. Meta tensors have no autocast: there the adapter's weights are cast to the
    input's dtype at each use, which is what ``policy.lora_precision``'s autocast does."""
    with torch.device(device):
        transformer = CausalWanTransformer3DModel(**preset.transformer)
    transformer.cast(dtype, device).requires_grad_(False)
    if lora is not None:
        attach_adapter(transformer, "plan", rank=lora.rank, alpha=lora.alpha,
                       target_modules=lora.target_modules or list(DEFAULT_TARGETS))
        if trainable and torch.device(device).type != "meta":
            keep_adapter_in_float32(transformer, "plan")
        for module in transformer.modules():
            if isinstance(module, LoraLayer):
                for linear in (*module.lora_A.values(), *module.lora_B.values()):
                    linear.weight.data = linear.weight.data.to(torch.float32 if trainable else dtype)
                    if trainable and torch.device(device).type == "meta" and dtype != torch.float32:
                        module.cast_input_dtype_enabled = False
                        linear.forward = _linear_in_input_dtype(linear)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    return StreamingVideoPolicy(transformer=transformer, sampler=preset.sampler, frames_per_chunk=preset.frames_per_chunk,
                                num_chunks=preset.num_chunks, latent_shape=preset.latent_shape,
                                local_window=preset.local_window, sink_frames=preset.sink_frames,
                                device=torch.device(device), dtype=dtype)


def text_encoder_bytes(dtype: torch.dtype) -> int:
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device(META):
        model = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    return sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8


def wan_vae(dtype: torch.dtype, device: torch.device = META):
    from diffusers import AutoencoderKLWan

    from policy.vae import WanVideoCodec

    with torch.device(device):
        vae = AutoencoderKLWan()
    codec = WanVideoCodec(vae.to(dtype=dtype))
    codec.latents_mean, codec.latents_std = codec.latents_mean.to(device), codec.latents_std.to(device)
    return codec


# ----------------------------------------------------------------------------------- simulations
def replay_memory(policy: StreamingVideoPolicy, micro_batch: int, pivot: int, text_tokens: int) -> dict[str, int]:
    """Bytes of one learner micro-batch: the rebuilt prefix cache (batch 1), what the forward with grad
    leaves saved for the backward, and the peak above the cache during forward + backward.

    Runs on ``policy.device`` (meta to plan, cpu to measure); the adapter's gradients must already
    exist (they are resident state, counted with the optimiser, not here)."""
    dev, f = policy.device, policy.frames_per_chunk
    prefix = torch.zeros(pivot * f, *policy.latent_shape, device=dev)
    x_t = torch.zeros(micro_batch, f, *policy.latent_shape, device=dev)
    steps = torch.full((micro_batch,), 500.0, device=dev)
    mem = TensorMemory()
    with mem, flash_attention_on_meta():
        # The group's text conditioning, as `policy.text_conditioning` returns it (a new stacked tensor).
        text = torch.zeros(1, text_tokens, policy.transformer.config.text_dim, device=dev, dtype=policy.dtype)
        cache = rebuild_prefix_cache(policy, text, prefix)
        cache_bytes = mem.live
        mem.reset_peak()
        x0 = replay_pivot_chunk(policy, text, prefix, x_t, steps, prefix_cache=cache)
        saved = mem.live - cache_bytes
        x0.float().square().mean().backward()
        peak = mem.peak - cache_bytes
    del cache
    return {"prefix_cache": cache_bytes, "saved_activations": saved, "forward_backward_peak": peak}


def rollout_memory(policy: StreamingVideoPolicy, group_size: int, branch_batch: int, text_tokens: int) -> int:
    """Peak bytes of ``rollout_group`` forked at the last chunk (the KV caches are preallocated whole,
    so the pivot does not change the peak)."""
    plan = NoisePlan.from_seed(0, policy.num_chunks, policy.frames_per_chunk, policy.latent_shape, policy.num_steps)
    group = plan.fork(policy.num_chunks - 1, group_size, 0.5)
    text = torch.zeros(1, text_tokens, policy.transformer.config.text_dim, device=policy.device, dtype=policy.dtype)
    mem = TensorMemory()
    with mem, flash_attention_on_meta():
        rollout_group(policy, text, group, record_final_latents=True, branch_batch_size=branch_batch)
    return mem.peak


def decode_memory(codec, videos: int, num_frames: int, latent_shape: tuple[int, int, int]) -> int:
    mem = TensorMemory()
    with mem, torch.no_grad():
        codec.to_pixels(torch.zeros(videos, num_frames, *latent_shape, device=codec.device))
    return mem.peak


# ------------------------------------------------------------------------------------------ roles
def _micro_batch(config: Config, num_steps: int) -> tuple[int, int]:
    algo = config.algorithm
    samples = {"copo": algo.anchors_per_group * num_steps, "sde_grpo": algo.group_size * (num_steps - 1)}
    if algo.objective not in samples:
        raise ValueError(f"algorithm.objective={algo.objective!r}: the planner covers copo and sde_grpo replay")
    total = samples[algo.objective]
    return total, min(total, getattr(algo, "micro_batch_size", None) or total)


def _resident_models(config: Config, dtype: torch.dtype, plan: RolePlan) -> None:
    if config.policy.text_encoder_path is not None:
        plan.parts["text_encoder_umt5_xxl"] = text_encoder_bytes(dtype) / GIB
    if config.policy.vae_path is not None:
        plan.parts["vae_weights"] = param_bytes(wan_vae(dtype).vae) / GIB


def plan_learner(config: Config) -> RolePlan:
    preset, dtype = get_preset(config.policy.preset), DTYPES[config.policy.dtype]
    ckpt = bool(getattr(config.policy, "activation_checkpointing", False))
    policy = meta_policy(preset, dtype, config.lora, trainable=True, checkpointing=ckpt)
    lora = lora_parameters(policy.transformer)
    for p in lora:
        p.grad = torch.zeros_like(p)
    lora_bytes = sum(p.numel() * 4 for p in lora)
    base_bytes = param_bytes(policy.transformer) - sum(p.numel() * p.element_size() for p in lora)
    total, micro = _micro_batch(config, policy.num_steps)
    mem = replay_memory(policy, micro, preset.num_chunks - 1, WAN_TEXT_LENGTH)
    plan = RolePlan()
    plan.parts["transformer_weights"] = base_bytes / GIB
    _resident_models(config, dtype, plan)
    plan.parts["lora_fp32"] = lora_bytes / GIB
    plan.parts["lora_grads_fp32"] = lora_bytes / GIB
    plan.parts["adam_state_fp32"] = 2 * lora_bytes / GIB
    plan.parts["prefix_cache"] = mem["prefix_cache"] / GIB
    plan.parts["saved_activations"] = mem["saved_activations"] / GIB
    plan.parts["backward_transient"] = (mem["forward_backward_peak"] - mem["saved_activations"]) / GIB
    plan.peak_gib = sum(plan.parts.values())
    plan.notes.append(f"{total} replay samples in micro-batches of {micro}; activation checkpointing "
                      f"{'on' if ckpt else 'off'}; pivot {preset.num_chunks - 1} (largest context)")
    return plan


def plan_rollout(config: Config) -> RolePlan:
    preset, dtype = get_preset(config.policy.preset), DTYPES[config.policy.dtype]
    policy = meta_policy(preset, dtype, config.lora)
    g = config.algorithm.group_size
    branch = config.rollout.branch_batch_size or g
    decode_batch = getattr(config.rollout, "decode_batch_size", None) or g
    plan = RolePlan()
    plan.parts["transformer_and_lora_weights"] = param_bytes(policy.transformer) / GIB
    _resident_models(config, dtype, plan)
    generation = rollout_memory(policy, g, branch, WAN_TEXT_LENGTH)
    plan.parts["generation_kv_caches_and_activations"] = generation / GIB
    prefix = policy.new_cache(1).nbytes()  # the layout the rollout allocates, on meta
    plan.notes.append(f"KV cache {prefix / GIB:.2f} GiB a video; prefix (batch 1) + {branch} branches alive")
    decode = 0
    if config.policy.vae_path is not None:
        decode = decode_memory(wan_vae(dtype), decode_batch, policy.num_frames, policy.latent_shape)
        plan.parts["vae_decode"] = decode / GIB
        plan.notes.append(f"decode of {decode_batch} videos in one call; KV caches are freed by then")
    resident = sum(v for k, v in plan.parts.items() if k not in ("generation_kv_caches_and_activations", "vae_decode"))
    plan.peak_gib = resident + max(generation, decode) / GIB
    return plan


def reward_tokens(height: int, width: int, num_frames: int, fps: float = 2.0, max_pixels: int = 200704) -> tuple[int, int]:
    """(vision patches, language tokens) of one video as VideoAlign's preprocessing makes them."""
    from reward_service.videoalign_inputs import VIDEO_MIN_PIXELS, frame_size, sample_frame_indices

    vision = QWEN2_VL_2B["vision_config"]
    n = len(sample_frame_indices(num_frames, WAN_FPS, fps))
    h, w = frame_size(height, width, VIDEO_MIN_PIXELS, max_pixels)
    patches = -(-n // vision["temporal_patch_size"]) * (h // vision["patch_size"]) * (w // vision["patch_size"])
    return patches, patches // vision["spatial_merge_size"] ** 2 + VIDEOALIGN_TEXT_TOKENS


def plan_reward(config: Config, height: int = 480, width: int = 832) -> RolePlan:
    """VideoAlign's Qwen2-VL-2B in bf16, inference only. Activations are sized from the token counts:
    the widest live set of one layer (input, residual, q/k/v, attention output, MLP in/out), x2."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    if config.reward.model != "videoalign":
        return RolePlan(notes=[f"reward.model={config.reward.model!r} is not a GPU model; nothing planned"])
    options = config.reward.options
    dtype = getattr(torch, options.get("dtype", "bfloat16"))
    micro = int(options.get("micro_batch_size", 2))
    qwen = Qwen2VLConfig(**QWEN2_VL_2B)
    with torch.device(META):
        model = Qwen2VLModel(qwen).to(dtype)
    preset = get_preset(config.policy.preset)
    frames = 1 + WAN_FRAME_STRIDE * (preset.frames_per_chunk * preset.num_chunks - 1)
    patches, tokens = reward_tokens(height, width, frames)
    t, v = QWEN2_VL_2B["text_config"], QWEN2_VL_2B["vision_config"]
    size = torch.finfo(dtype).bits // 8
    vision_live = micro * patches * (6 * v["embed_dim"] + 2 * v["mlp_ratio"] * v["embed_dim"]) * size
    text_live = micro * tokens * (6 * t["hidden_size"] + 3 * t["intermediate_size"]) * size
    plan = RolePlan()
    plan.parts["qwen2_vl_2b_weights"] = param_bytes(model) / GIB
    plan.parts["activations"] = 2 * max(vision_live, text_live) / GIB
    plan.peak_gib = sum(plan.parts.values())
    plan.notes.append(f"{micro} videos a forward, {patches} vision patches and {tokens} tokens a video")
    return plan


def plan(config: Config) -> dict[str, RolePlan]:
    return {"rollout": plan_rollout(config), "learner": plan_learner(config), "reward": plan_reward(config)}


def _table(plans: dict[str, RolePlan]) -> str:
    lines = []
    for role, p in plans.items():
        lines.append(f"{role:8s} peak {p.peak_gib:7.2f} GiB")
        lines += [f"    {k:40s} {v:8.3f}" for k, v in p.parts.items()]
        lines += [f"    ({n})" for n in p.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.micro_batch_size=4")
    args = parser.parse_args(argv)
    plans = plan(load_config(args.config, args.overrides))
    print(json.dumps({k: v.as_dict() for k, v in plans.items()}, indent=2) if args.json else _table(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
