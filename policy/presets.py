"""Named policy configurations and the one function that builds a policy from them.

Real presets (Wan2.1-T2V-1.3B made block-causal) load their weights through ``policy.checkpoints``,
``policy.text_encoder`` and ``policy.vae`` from paths given by configuration. ``tiny-*`` presets are
randomly initialised, for tests and benchmarks. Plug-ins (``policy.plugins``) add presets: eagerly
with ``register_preset``, or by naming the module that registers one (``policy.plugins.register_preset_module``), imported
on first request. A preset with its own weights format registers a loader (``register_preset``'s ``loader``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from policy.pipeline import StreamingVideoPolicy, TextEncoder, VideoCodec
from policy.plugins import PRESET_MODULES, load_plugins, plugin_note
from policy.sampler import SamplerConfig
from policy.transformer_causal_wan import CausalWanTransformer3DModel

WAN21_T2V_1_3B: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

TINY_TRANSFORMER: dict[str, Any] = {
    **WAN21_T2V_1_3B,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
}

# How ``checkpoint_path`` is read (``policy.checkpoints``); "random" draws fresh weights (test sizes).
CheckpointKind = Literal["self_forcing", "causal_forcing", "longlive", "diffusers", "random"]


class PolicyPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    transformer: dict[str, Any]
    frames_per_chunk: int = Field(gt=0)
    num_chunks: int = Field(gt=0)
    latent_shape: tuple[int, int, int]
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    local_window: int | None = None
    sink_frames: int = 0
    checkpoint_kind: CheckpointKind = "random"
    checkpoint_path: str | None = None
    lora_path: str | None = None  # LongLive ships its LoRA separately; merged at load
    text_encoder_path: str | None = None
    vae_path: str | None = None
    fps: float = 16.0  # playback rate of the decoded videos (Wan2.1's 16 fps)
    ood_metric: str | None = None  # default out-of-domain metric (``policy.plugins``) when evaluating merges

    def with_paths(self, **paths: str | None) -> PolicyPreset:
        unknown = set(paths) - {"checkpoint_path", "lora_path", "text_encoder_path", "vae_path"}
        if unknown:
            raise ValueError(f"unknown preset path fields: {sorted(unknown)}")
        return self.model_copy(update=paths)


# (weights directory or None for the preset's own, device, dtype) -> a ready policy
PresetLoader = Callable[..., StreamingVideoPolicy]

_REGISTRY: dict[str, PolicyPreset] = {}
_LOADERS: dict[str, PresetLoader] = {}
_LAZY_MODULES = PRESET_MODULES  # filled by plug-ins, without importing this module (it imports torch)


def register_preset(preset: PolicyPreset, loader: PresetLoader | None = None) -> PolicyPreset:
    """``loader(weights, device=, dtype=)`` replaces ``build_policy`` for a preset that ships its own weights
    format; ``weights`` is the directory a config's ``policy.transformer_checkpoint`` names, or None."""
    _REGISTRY[preset.name] = preset
    if loader is not None:
        _LOADERS[preset.name] = loader
    return preset


def get_preset(name: str) -> PolicyPreset:
    if name not in _REGISTRY and name not in _LAZY_MODULES:
        load_plugins()
    if name not in _REGISTRY and name in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown policy preset {name!r}; known: {list_presets()}{plugin_note()}")
    return _REGISTRY[name]


def preset_loader(name: str) -> PresetLoader | None:
    """The loader the preset ``name`` registered, or None when ``build_policy`` builds it."""
    get_preset(name)
    return _LOADERS.get(name)


def list_presets() -> list[str]:
    load_plugins()
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def _require(preset: PolicyPreset, field: str) -> str:
    value = getattr(preset, field)
    if not value:
        raise ValueError(f"preset {preset.name!r} needs {field} to build a policy (set it in the config)")
    return value


def _load_text_encoder(path: str, device, dtype) -> TextEncoder:
    """A transformers/diffusers umT5 directory, or Wan's own T5 checkpoint (file or Wan folder)."""
    from policy.text_encoder import UMT5TextEncoder

    root = Path(path)
    if (root / "config.json").is_file() or (root / "text_encoder").is_dir():
        return UMT5TextEncoder.from_pretrained(root, dtype=dtype, device=device)
    return UMT5TextEncoder.from_wan_checkpoint(root, dtype=dtype, device=device)


def build_policy(
    preset: PolicyPreset | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder: TextEncoder | None = None,
    codec: VideoCodec | None = None,
    seed: int = 0,
) -> StreamingVideoPolicy:
    """A ready policy. ``random`` presets draw weights from ``seed``; others load checkpoints.

    An explicitly passed ``text_encoder`` / ``codec`` is used instead of loading one.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    if preset.checkpoint_kind == "random":
        with torch.random.fork_rng(devices=[]):  # CPU draws: the same weights on every machine
            torch.manual_seed(seed)
            transformer = CausalWanTransformer3DModel(**preset.transformer)
    else:
        from policy.checkpoints import load_transformer_checkpoint

        checkpoint = _require(preset, "checkpoint_path")  # every missing path fails before any loading
        text_path = None if text_encoder is not None else _require(preset, "text_encoder_path")
        vae_path = None if codec is not None else _require(preset, "vae_path")
        with torch.device(device):  # skip a full-size CPU initialisation that the load overwrites
            transformer = CausalWanTransformer3DModel(**preset.transformer)
        kwargs = {"lora_path": preset.lora_path} if preset.lora_path else {}
        load_transformer_checkpoint(checkpoint, transformer, preset.checkpoint_kind, **kwargs)
        if text_path is not None:
            text_encoder = _load_text_encoder(text_path, device, dtype)
        if vae_path is not None:
            from policy.vae import WanVideoCodec, codec_dtype

            codec = WanVideoCodec.from_pretrained(vae_path, dtype=codec_dtype(dtype, device), device=device)
    transformer = transformer.cast(dtype, device).eval().requires_grad_(False)
    return StreamingVideoPolicy(
        transformer=transformer,
        sampler=preset.sampler,
        frames_per_chunk=preset.frames_per_chunk,
        num_chunks=preset.num_chunks,
        latent_shape=preset.latent_shape,
        text_encoder=text_encoder,
        codec=codec,
        local_window=preset.local_window,
        sink_frames=preset.sink_frames,
        device=torch.device(device),
        dtype=dtype,
    )


_REAL = dict(transformer=WAN21_T2V_1_3B, latent_shape=(16, 60, 104))
register_preset(
    PolicyPreset(
        name="self-forcing-1.3b",
        description="Self-Forcing DMD (chunk-wise, 3 latent frames a chunk, 7 chunks = 81 frames at 480x832)",
        frames_per_chunk=3,
        num_chunks=7,
        checkpoint_kind="self_forcing",
        **_REAL,
    )
)
register_preset(
    PolicyPreset(
        name="causal-forcing-1.3b",
        description="Causal-Forcing chunk-wise 4-step",
        frames_per_chunk=3,
        num_chunks=7,
        checkpoint_kind="causal_forcing",
        **_REAL,
    )
)
register_preset(
    PolicyPreset(
        name="causal-forcing-framewise-1.3b",
        description="Causal-Forcing frame-wise 4-step (1 latent frame a chunk)",
        frames_per_chunk=1,
        num_chunks=21,
        checkpoint_kind="causal_forcing",
        **_REAL,
    )
)
# Causal-Forcing++ (configs/causal_forcing_dmd_framewise_{2,1}step.yaml): frame-wise, chunk 0 in 4 steps
# ("first-frame 4-step"), every later chunk in 2 or 1.
CAUSAL_FORCING_PP_2STEP = SamplerConfig(denoising_step_list=(1000, 500), first_chunk_step_list=(1000, 750, 500, 250))
CAUSAL_FORCING_PP_1STEP = SamplerConfig(denoising_step_list=(1000,), first_chunk_step_list=(1000, 750, 500, 250))
register_preset(
    PolicyPreset(
        name="causal-forcing-pp-framewise-2step-1.3b",
        description="Causal-Forcing++ frame-wise 2-step (framewise-2step.pt): chunk 0 in 4 steps, the rest in 2",
        frames_per_chunk=1,
        num_chunks=21,
        sampler=CAUSAL_FORCING_PP_2STEP,
        checkpoint_kind="causal_forcing",
        **_REAL,
    )
)
register_preset(
    PolicyPreset(
        name="causal-forcing-pp-framewise-1step-1.3b",
        description="Causal-Forcing++ frame-wise 1-step (framewise-1step.pt): chunk 0 in 4 steps, the rest in 1",
        frames_per_chunk=1,
        num_chunks=21,
        sampler=CAUSAL_FORCING_PP_1STEP,
        checkpoint_kind="causal_forcing",
        **_REAL,
    )
)
register_preset(
    PolicyPreset(
        name="longlive-1.3b",
        description="LongLive v1: local attention window of 12 latent frames with 3 sink frames",
        frames_per_chunk=3,
        num_chunks=7,
        local_window=12,
        sink_frames=3,
        checkpoint_kind="longlive",
        **_REAL,
    )
)
register_preset(
    PolicyPreset(
        name="longlive-1.3b-long",
        description="LongLive v1 as its inference runs (longlive_inference.yaml): 120 latent frames (40 chunks), "
        "window 12 with 3 sink frames; the cache never holds more than the window",
        frames_per_chunk=3,
        num_chunks=40,
        local_window=12,
        sink_frames=3,
        checkpoint_kind="longlive",
        **_REAL,
    )
)

_TINY = dict(transformer=TINY_TRANSFORMER, latent_shape=(4, 8, 8), checkpoint_kind="random")
register_preset(PolicyPreset(name="tiny", description="test size, 3-frame chunks", frames_per_chunk=3, num_chunks=3, **_TINY))
register_preset(
    PolicyPreset(name="tiny-framewise", description="test size, 1-frame chunks", frames_per_chunk=1, num_chunks=5, **_TINY)
)
register_preset(
    PolicyPreset(
        name="tiny-window",
        description="test size with a LongLive-style window (4 frames incl. 1 sink) that evicts",
        frames_per_chunk=1,
        num_chunks=6,
        local_window=4,
        sink_frames=1,
        **_TINY,
    )
)
register_preset(
    PolicyPreset(
        name="mid",
        description="benchmark size: dim 256, 4 layers, 8x16x16 latents, 3-frame chunks",
        transformer={**TINY_TRANSFORMER, "num_attention_heads": 4, "attention_head_dim": 64, "in_channels": 8,
                     "out_channels": 8, "text_dim": 64, "freq_dim": 64, "ffn_dim": 768, "num_layers": 4},
        latent_shape=(8, 16, 16),
        frames_per_chunk=3,
        num_chunks=4,
        checkpoint_kind="random",
    )
)
