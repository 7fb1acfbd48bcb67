"""Tiny Wan transformers and checkpoints written the way each upstream project writes them.

The diffusers -> original Wan renaming here is written independently of diffusers' own converter (which
the loader uses), so loading these files checks the converter rather than repeating it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from policy.transformer_causal_wan import CausalWanTransformer3DModel

TINY_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=8,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)


def transformer_classes() -> list[type]:
    """The diffusers model and the project's causal subclass (same config, same keys)."""
    return [WanTransformer3DModel, CausalWanTransformer3DModel]


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (norm scales too), so a swapped or dropped tensor shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def tiny_transformer(cls: type = WanTransformer3DModel, seed: int = 0) -> torch.nn.Module:
    return randomize_(cls(**TINY_WAN_CONFIG), seed).eval()


def tiny_inputs(seed: int = 1, batch: int = 1, frames: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    cfg = TINY_WAN_CONFIG
    return dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], frames, 4, 4, generator=generator),
        timestep=torch.tensor([730.0] * batch),
        encoder_hidden_states=torch.randn(batch, 5, cfg["text_dim"], generator=generator),
    )


@torch.no_grad()
def forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """diffusers' own forward (the causal subclass is the same network with one chunk)."""
    return WanTransformer3DModel.forward(model, **inputs, return_dict=False)[0]


@torch.no_grad()
def forward_block_causal(model: CausalWanTransformer3DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal model's own path: one latent frame a chunk, frames-first."""
    latents = inputs["hidden_states"].permute(0, 2, 1, 3, 4)
    return model.forward_dense(latents, inputs["timestep"], inputs["encoder_hidden_states"], frames_per_chunk=1)


# --- diffusers names -> original Wan names (independent of diffusers' converter) ---------------------
_TOP_LEVEL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_BLOCK_MODULE = {
    "attn1": "self_attn",
    "attn2": "cross_attn",
    "norm2": "norm3",  # diffusers' cross-attention norm is the original norm3
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_ATTN_PART = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def original_module_name(name: str) -> str:
    """A diffusers module path (no trailing parameter name) -> the original Wan module path."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _BLOCK_KEY.match(name)
    if match is None:
        raise KeyError(f"no original Wan name for {name!r}")
    index, rest = match.groups()
    if rest in _BLOCK_MODULE:
        return f"blocks.{index}.{_BLOCK_MODULE[rest]}"
    attn, _, part = rest.partition(".")
    return f"blocks.{index}.{_BLOCK_MODULE[attn]}.{_ATTN_PART[part]}"


def to_original_wan_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key == "scale_shift_table":
            out["head.modulation"] = value
        elif key.endswith(".scale_shift_table"):
            out[key.replace(".scale_shift_table", ".modulation")] = value
        else:
            module, _, param = key.rpartition(".")
            out[f"{original_module_name(module)}.{param}"] = value
    return out


def generator_entry(model: torch.nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The state dict as the Self-Forcing-family generator wrapper saves it (original names, prefixed)."""
    return {prefix + k: v.clone() for k, v in to_original_wan_names(model.state_dict()).items()}


def save_self_forcing(path: Path, generator, generator_ema=None, critic=None, prefix: str = "model.") -> Path:
    """Self-Forcing's trainer: ``{"generator", "critic"[, "generator_ema"]}``."""
    checkpoint = {"generator": generator_entry(generator, prefix)}
    checkpoint["critic"] = generator_entry(critic if critic is not None else generator, prefix)
    if generator_ema is not None:
        checkpoint["generator_ema"] = generator_entry(generator_ema, prefix)
    torch.save(checkpoint, path)
    return path


def save_causal_forcing(path: Path, model, variant: str) -> Path:
    """Causal-Forcing's trainer keeps one entry: chunk-wise ``generator``, frame-wise ``generator_ema``
    (the EMA shadow's names carry the FSDP wrapper segment)."""
    if variant == "chunkwise":
        checkpoint = {"generator": generator_entry(model, "model.")}
    elif variant == "framewise":
        checkpoint = {"generator_ema": generator_entry(model, "model._fsdp_wrapped_module.")}
    else:
        raise ValueError(variant)
    torch.save(checkpoint, path)
    return path


LINEARS_PER_BLOCK = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)


def random_block_lora(model: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA on every Linear of every block, PEFT's saved names in diffusers module paths."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index in range(len(model.blocks)):
        for linear in LINEARS_PER_BLOCK:
            module = model.get_submodule(f"blocks.{index}.{linear}")
            name = f"blocks.{index}.{linear}"
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
    return state


def save_longlive(directory: Path, base, lora_state: dict[str, torch.Tensor]) -> Path:
    """LongLive v1: ``longlive_base.pt`` (``generator``) and ``lora.pt`` (``generator_lora``: PEFT's
    ``get_peft_model_state_dict`` of the wrapped original-Wan model, ``base_model.model.`` prefixed)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": generator_entry(base, "model.")}, directory / "longlive_base.pt")
    lora = {}
    for key, value in lora_state.items():
        module, _, tail = key.partition(".lora_")
        lora[f"base_model.model.{original_module_name(module)}.lora_{tail}"] = value.clone()
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 3}, directory / "lora.pt")
    return directory
