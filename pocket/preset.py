"""The pocket preset: the block-causal Wan transformer at a tiny size, with the pocket codec and text encoder.

``load_pocket_policy()`` returns a ready :class:`StreamingVideoPolicy` with the shipped weights
(``pocket/weights/``: diffusers ``config.json`` + ``diffusion_pytorch_model.safetensors``, the
codec's ``codec.safetensors``, and ``pocket.json`` with the geometry and the training record).

Geometry: 16 frames of 32x32 RGB at 8 fps -> latents ``[8, 16, 8, 8]`` -> 4 chunks of 2 latent frames,
16 tokens per latent frame; 4-step sampler on Self-Forcing's step list with shift 0.08 instead of 5: timesteps
``[1000, 193.5, 74.1, 26.0]``. ``pocket.json`` also records the sampler the weights were trained for, and
``load_pocket_policy`` samples with it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from policy.pipeline import StreamingVideoPolicy
from pocket import domain
from pocket.codec import CODEC_FILE, PocketCodec, fit_codec
from pocket.text_encoder import PocketTextEncoder
from policy.presets import PolicyPreset, register_preset
from policy.sampler import SamplerConfig
from policy.transformer_causal_wan import CausalWanTransformer3DModel

WEIGHTS_DIR = Path(__file__).parent / "weights"
POCKET_FILE = "pocket.json"

TEXT_DIM = 32
TEXT_TOKENS = 12
FRAMES_PER_CHUNK = 2
NUM_CHUNKS = 4

POCKET_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": TEXT_DIM,
    "freq_dim": 64,
    "ffn_dim": 512,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}
LATENT_SHAPE = (16, 8, 8)
# Self-Forcing's shift 5 puts the second step at sigma 0.94, where a 16-token frame keeps too little of the
# first step's prediction to follow it (``experiments.pocket_studies.step_readout``); the resolution-dependent shift rule
# (shift ~ sqrt(tokens)) scales 5 at 1560 tokens per latent frame to ~0.5 at 16. At 0.5 one re-noise draw
# still moved the output by 6-15 % (the steps after the first are imperfect denoisers that pass part of
# their input noise through); at 0.08 the later steps see sigma 0.19 / 0.07 / 0.03, so they refine the
# first step's choice and a re-noise draw moves the output by 1.5-8 % (docs/pocket.md, Figure 6 study).
POCKET_SHIFT = 0.08
LATENT_SCALE = 2.5
CODEC_FIT_VIDEOS = 384  # real training-prompt videos (seeds 0..N-1) the codec's PCA is fit on


@functools.lru_cache(maxsize=1)
def fit_pocket_codec() -> PocketCodec:
    """The codec as training fits it: PCA of real videos of the training prompts, fixed seeds (cached)."""
    prompts = domain.train_prompts()
    videos = domain.generate_batch([prompts[i % len(prompts)] for i in range(CODEC_FIT_VIDEOS)], range(CODEC_FIT_VIDEOS))
    return fit_codec(videos, components=LATENT_SHAPE[0] // 2, time_stride=2, space_stride=4, scale=LATENT_SCALE)


def pocket_codec(weights_dir: str | Path = WEIGHTS_DIR) -> PocketCodec:
    """The codec stored with the weights (the shipped one by default)."""
    return PocketCodec.load(weights_dir, fps=domain.FPS)


def pocket_text_encoder() -> PocketTextEncoder:
    return PocketTextEncoder(dim=TEXT_DIM, max_tokens=TEXT_TOKENS)


def _load_for_config(weights: str | Path | None, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> StreamingVideoPolicy:
    """The preset's loader: a run's ``policy.transformer_checkpoint`` names a weights directory, else the shipped one."""
    return load_pocket_policy(weights or WEIGHTS_DIR, device=device, dtype=dtype)


POCKET_PRESET = register_preset(
    PolicyPreset(
        name="pocket",
        description=(
            "pocket world: tiny block-causal Wan (dim 128, 4 layers) on 16x32x32 synthetic videos, "
            "4 chunks of 2 latent frames; load with pocket.load_pocket_policy()"
        ),
        transformer=POCKET_TRANSFORMER,
        frames_per_chunk=FRAMES_PER_CHUNK,
        num_chunks=NUM_CHUNKS,
        latent_shape=LATENT_SHAPE,
        sampler=SamplerConfig(shift=POCKET_SHIFT),
        fps=domain.FPS,
        ood_metric="pocket_fvd",
    ),
    loader=_load_for_config,
)


def new_transformer(seed: int = 0) -> CausalWanTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalWanTransformer3DModel(**POCKET_TRANSFORMER)


def policy_from_transformer(
    transformer: CausalWanTransformer3DModel,
    codec: PocketCodec | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    sampler: SamplerConfig | None = None,
) -> StreamingVideoPolicy:
    """Wrap a pocket-sized transformer into a policy with the pocket text encoder, ``sampler`` (default: the
    preset's) and ``codec`` (default: the shipped codec, or the codec as training fits it when none is shipped)."""
    if codec is None:
        codec = pocket_codec() if (WEIGHTS_DIR / CODEC_FILE).is_file() else fit_pocket_codec()
    if next(transformer.parameters()).dtype != dtype:
        transformer = transformer.to(dtype=dtype)
    transformer = transformer.to(device=device).eval().requires_grad_(False)
    return StreamingVideoPolicy(
        transformer=transformer,
        sampler=sampler or POCKET_PRESET.sampler,
        frames_per_chunk=FRAMES_PER_CHUNK,
        num_chunks=NUM_CHUNKS,
        latent_shape=LATENT_SHAPE,
        text_encoder=pocket_text_encoder(),
        codec=codec,
        device=torch.device(device),
        dtype=dtype,
    )


def read_pocket_record(weights_dir: str | Path = WEIGHTS_DIR) -> dict[str, Any]:
    path = Path(weights_dir) / POCKET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the pocket generator with `python -m pocket.train`")
    return json.loads(path.read_text())


def load_pocket_policy(
    weights_dir: str | Path = WEIGHTS_DIR,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StreamingVideoPolicy:
    """The trained pocket generator (shipped weights by default) as a ready policy."""
    from policy.checkpoints import check_state_matches
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    record = read_pocket_record(weights_dir)
    weights = weights_dir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: train the pocket generator with `python -m pocket.train`")
    config = json.loads((weights_dir / "config.json").read_text())
    arch = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in POCKET_TRANSFORMER}
    if arch != POCKET_TRANSFORMER:
        diff = {k: (arch.get(k), v) for k, v in POCKET_TRANSFORMER.items() if arch.get(k) != v}
        raise ValueError(f"{weights_dir}/config.json does not describe the pocket transformer: {diff}")
    if record.get("latent_scale") != LATENT_SCALE:
        raise ValueError(f"{weights_dir}/{POCKET_FILE} latent_scale {record.get('latent_scale')} != {LATENT_SCALE}")
    transformer = CausalWanTransformer3DModel(**POCKET_TRANSFORMER)
    state = load_file(weights, device="cpu")
    check_state_matches(transformer, state, str(weights))
    transformer.load_state_dict(state, strict=True)
    codec = PocketCodec.load(weights_dir, fps=domain.FPS)
    return policy_from_transformer(transformer, codec, device, dtype, sampler_of_record(record, weights_dir))


def sampler_of_record(record: dict[str, Any], weights_dir: str | Path = WEIGHTS_DIR) -> SamplerConfig:
    """The sampler the weights were trained for (``pocket.json``'s ``sampler``), else the preset's."""
    if "sampler" not in record:
        return POCKET_PRESET.sampler
    try:
        return SamplerConfig(**record["sampler"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{Path(weights_dir) / POCKET_FILE}: bad 'sampler' entry: {err}") from err


def save_pocket_weights(
    transformer: CausalWanTransformer3DModel,
    weights_dir: str | Path,
    record: dict[str, Any],
    codec: PocketCodec | None = None,
    sampler: SamplerConfig | None = None,
) -> Path:
    """Write ``config.json`` + safetensors (diffusers layout), the codec and ``pocket.json`` into ``weights_dir``.

    Without ``codec`` the codec is fit as training fits it (``fit_pocket_codec``); ``pocket.json`` records
    ``sampler`` (default: the preset's), the sampler the weights are loaded with, as diffusers keeps a
    scheduler's config beside its model."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(weights_dir, safe_serialization=True)
    (codec or fit_pocket_codec()).save(weights_dir)
    full = {"latent_scale": LATENT_SCALE, "frames_per_chunk": FRAMES_PER_CHUNK, "num_chunks": NUM_CHUNKS,
            "text_encoder_id": pocket_text_encoder().encoder_id,
            "sampler": (sampler or POCKET_PRESET.sampler).model_dump(), **record}
    (weights_dir / POCKET_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return weights_dir
