"""Real-size models with random weights (no download), for the CPU smoke and the GPU benchmark.

- the preset's transformer (Wan2.1-1.3B width and depth), built on ``meta`` and materialised tensor
  by tensor in its final dtype, so a 1.3B model never exists in float32 on a small machine;
- Wan's VAE (diffusers ``AutoencoderKLWan``, default = Wan2.1's config), random;
- a *tiny* stand-in for umT5-XXL: one small umT5 layer with the real output width (4096) and
  sequence length (512), zero past each prompt, so the transformer sees real-shaped text.
  The real encoder (5.7 B parameters) is not built: it runs once per prompt and is cached.
"""

from __future__ import annotations

import hashlib

import torch

from policy.pipeline import StreamingVideoPolicy
from policy.presets import PolicyPreset, get_preset
from policy.text_encoder import WAN_TEXT_LENGTH
from policy.transformer_causal_wan import CausalWanTransformer3DModel


def materialize_random_(module: torch.nn.Module, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> None:
    """Replace every meta parameter/buffer by a random real one: ``dtype``, except the modules the
    model keeps in float32; weights ~ N(0, 0.02), 1-D weights (norm scales) 1, biases 0."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for prefix, sub in module.named_modules():
        for local, param in list(sub._parameters.items()):
            if param is None:
                continue
            name = f"{prefix}.{local}" if prefix else local
            target = torch.float32 if keep & set(name.split(".")) else dtype
            data = torch.empty(param.shape, dtype=target, device=device)
            if local == "bias":
                data.zero_()
            elif param.ndim == 1:
                data.fill_(1.0)
            elif data.device.type == "cpu":
                data.normal_(0.0, 0.02, generator=gen)  # in place, in the final dtype: no float32 copy
            else:
                data.copy_(torch.randn(param.shape, generator=gen, dtype=target).mul_(0.02))
            sub._parameters[local] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
        for local, buf in list(sub._buffers.items()):
            if buf is not None and buf.device.type == "meta":
                sub._buffers[local] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)


def random_transformer(preset: PolicyPreset, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    with torch.device("meta"):
        transformer = CausalWanTransformer3DModel(**preset.transformer)
    materialize_random_(transformer, dtype, device, seed)
    return transformer.cast(dtype, device).eval().requires_grad_(False)


def random_wan_codec(dtype: torch.dtype, device: torch.device | str, seed: int = 1, config: dict | None = None):
    """Wan's VAE (``config`` overrides diffusers' defaults, which are Wan2.1's) with random weights."""
    from diffusers import AutoencoderKLWan

    from policy.vae import WanVideoCodec, codec_dtype

    with torch.device("meta"):
        vae = AutoencoderKLWan(**(config or {}))
    materialize_random_(vae, codec_dtype(dtype, device), device, seed)
    codec = WanVideoCodec(vae)
    codec.latents_mean, codec.latents_std = codec.latents_mean.to(device), codec.latents_std.to(device)
    return codec


class TinyWideTextEncoder:
    """One random umT5 layer with umT5-XXL's output width: ``[B, 512, 4096]``, zero past the prompt."""

    encoder_id = "tiny-umt5-width-4096"

    def __init__(self, dim: int = 4096, dtype: torch.dtype = torch.float32, device="cpu", vocab: int = 1024) -> None:
        from transformers import UMT5Config, UMT5EncoderModel

        config = UMT5Config(vocab_size=vocab, d_model=dim, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                            feed_forward_proj="gated-gelu", dropout_rate=0.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = UMT5EncoderModel(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.vocab, self.device = vocab, torch.device(device)

    def _ids(self, prompt: str) -> list[int]:
        words = prompt.split()[: WAN_TEXT_LENGTH - 1]
        return [int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little") % (self.vocab - 2) + 2 for w in words] + [1]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), WAN_TEXT_LENGTH, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            row = self._ids(prompt)
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return (hidden * mask[..., None]).float()


def real_size_policy(preset_name: str, dtype: torch.dtype, device: torch.device | str, *,
                     latent_shape: tuple[int, int, int] | None = None, num_chunks: int | None = None,
                     with_codec: bool = True, vae_config: dict | None = None, seed: int = 0) -> StreamingVideoPolicy:
    """The named preset at its real width and depth with random weights; optionally a smaller latent
    (``latent_shape``) and fewer chunks, which change token counts only, not a weight."""
    preset = get_preset(preset_name)
    update = {k: v for k, v in (("latent_shape", latent_shape), ("num_chunks", num_chunks)) if v is not None}
    preset = preset.model_copy(update=update)
    return StreamingVideoPolicy(
        transformer=random_transformer(preset, dtype, device, seed),
        sampler=preset.sampler,
        frames_per_chunk=preset.frames_per_chunk,
        num_chunks=preset.num_chunks,
        latent_shape=preset.latent_shape,
        text_encoder=TinyWideTextEncoder(preset.transformer["text_dim"], dtype, device),
        codec=random_wan_codec(dtype, device, config=vae_config) if with_codec else None,
        local_window=preset.local_window,
        sink_frames=preset.sink_frames,
        device=torch.device(device),
        dtype=dtype,
    )
