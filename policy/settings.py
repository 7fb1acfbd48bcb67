"""The `policy` and `lora` sections of the run configuration: which policy to build and its adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from policy.settings_types import Int, Real, Section


class PolicySettings(Section):
    preset: str = "pocket"
    # Paths to real weights; None means the preset's own (the pocket preset ships its weights).
    transformer_checkpoint: Path | None = None
    checkpoint_kind: Literal["self_forcing", "causal_forcing", "longlive", "diffusers"] | None = None
    longlive_lora: Path | None = None
    text_encoder_path: Path | None = None
    vae_path: Path | None = None
    device: str = "auto"
    # Dtype of the frozen base weights and of the compute; the trainable LoRA adapter, its gradients, the
    # optimiser state and the checkpointed adapter stay float32 whatever this is (policy/lora_precision.py).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Recompute each transformer block's activations in the learner's backward (torch.utils.checkpoint
    # per block) instead of saving them: the saved activations of a replayed sample shrink to each
    # block's input; the backward costs one more forward. Same gradient either way.
    activation_checkpointing: bool = False


class LoraSettings(Section):
    rank: Int = Field(64, gt=0)
    alpha: Real = Field(128.0, gt=0)
    target_modules: list[str] | None = None  # None: every attention and FFN linear of the blocks
