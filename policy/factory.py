"""Build the policy a run configures, on the device it asks for, with the run's LoRA adapter."""

from __future__ import annotations

import torch

from policy.lora import DEFAULT_TARGETS, attach_adapter
from policy.lora_precision import keep_adapter_in_float32
from policy.pipeline import StreamingVideoPolicy
from policy.presets import build_policy, get_preset, preset_loader
from policy.settings import LoraSettings, PolicySettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_configured_policy(settings: PolicySettings) -> StreamingVideoPolicy:
    """The frozen base policy: preset plus the paths the config gives for real weights.

    A preset with its own loader (the pocket world's shipped weights) loads from the directory
    `transformer_checkpoint` names, else its own weights."""
    device, dtype = resolve_device(settings.device), DTYPES[settings.dtype]
    loader = preset_loader(settings.preset)
    if loader is not None:
        return _with_memory_settings(loader(settings.transformer_checkpoint, device=device, dtype=dtype), settings)
    preset = get_preset(settings.preset)
    paths = {
        "checkpoint_path": settings.transformer_checkpoint,
        "lora_path": settings.longlive_lora,
        "text_encoder_path": settings.text_encoder_path,
        "vae_path": settings.vae_path,
    }
    paths = {k: str(v) for k, v in paths.items() if v is not None}
    if settings.checkpoint_kind is not None:
        preset = preset.model_copy(update={"checkpoint_kind": settings.checkpoint_kind})
    if paths:
        preset = preset.with_paths(**paths)
    return _with_memory_settings(build_policy(preset, device=device, dtype=dtype), settings)


def _with_memory_settings(policy: StreamingVideoPolicy, settings: PolicySettings) -> StreamingVideoPolicy:
    if settings.activation_checkpointing:  # takes effect in forwards with grad only (the learner's)
        policy.transformer.enable_gradient_checkpointing()
    return policy


def add_adapter(policy: StreamingVideoPolicy, name: str, lora: LoraSettings, train: bool = True) -> None:
    """Attach a LoRA adapter named `name` (zero-initialised B, so the policy is unchanged).

    One the learner trains (`train`) is held in float32 and computed in the base dtype
    (`keep_adapter_in_float32`); a rollout worker's stays in the base dtype, as the broadcast arrives."""
    targets = lora.target_modules or list(DEFAULT_TARGETS)
    attach_adapter(policy.transformer, name, rank=lora.rank, alpha=lora.alpha, target_modules=targets)
    if train:
        keep_adapter_in_float32(policy.transformer, name)
    policy.transformer.to(policy.device)
