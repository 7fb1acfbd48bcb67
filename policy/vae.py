"""Wan's video VAE (diffusers ``AutoencoderKLWan``) between uint8 frames and normalised latents.

Latents are frames-first ``[B, F, C, h, w]`` and normalised per channel as Wan and the Self-Forcing
family do: ``z = (mu - mean) / std`` on encode (``mu`` the posterior mean, no sampling) and
``mu = z * std + mean`` on decode, with ``mean``/``std`` the VAE config's ``latents_mean``/``latents_std``.
``T = 1 + 4 (F - 1)`` frames, 8x spatial stride, 16 fps. Same interface as the pocket codec.

Loads a diffusers VAE directory (or a pipeline directory with ``vae/``), or Wan's own ``Wan2.1_VAE.pth``
through diffusers' converter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import load_file

from policy.checkpoints import check_state_matches, torch_load_tensors

logger = logging.getLogger(__name__)

WAN_FPS = 16.0
WAN_VAE_FILE = "Wan2.1_VAE.pth"
_ORIGINAL_VAE_MARKERS = ("encoder.conv1.weight", "decoder.middle.0.residual.0.gamma", "conv1.weight")


def codec_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The VAE's dtype for a policy in `dtype` on `device`: the policy's on an accelerator, float32 on a
    CPU. CPUs without native bf16 (no AVX512-BF16 / AMX) run a half-precision Conv3d through a reference
    kernel about 150x slower than float32 (measured: 16.6 s against 0.11 s for one 96-channel 3x3x3 conv
    on 34x34x4), which turns a decode of seconds into tens of minutes; float32 is also the exact one."""
    return dtype if torch.device(device).type != "cpu" else torch.float32


class WanVideoCodec:
    def __init__(self, vae: AutoencoderKLWan, fps: float = WAN_FPS) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.fps = float(fps)
        config = vae.config
        self.time_stride = int(config.get("scale_factor_temporal") or 2 ** sum(config.temperal_downsample))
        self.space_stride = int(config.get("scale_factor_spatial") or 2 ** len(config.temperal_downsample))
        channels = config.z_dim
        if len(config.latents_mean) != channels or len(config.latents_std) != channels:
            raise ValueError(f"VAE config latents_mean/latents_std must have z_dim={channels} entries")
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, 1, channels, 1, 1)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, 1, channels, 1, 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self._check(num_frames, height, width)
        s = self.space_stride
        return 1 + (num_frames - 1) // self.time_stride, self.latent_channels, height // s, width // s

    def num_frames(self, num_latent_frames: int) -> int:
        return 1 + self.time_stride * (num_latent_frames - 1)

    def _check(self, t: int, h: int, w: int) -> None:
        if t < 1 or (t - 1) % self.time_stride or h % self.space_stride or w % self.space_stride:
            raise ValueError(
                f"video of {t} frames at {h}x{w}: Wan's VAE needs 1 + {self.time_stride}k frames "
                f"and a size divisible by {self.space_stride}"
            )

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents ``[B, F, C, h, w]`` -> normalised ``(mu - mean) / std``."""
        return (mu - self.latents_mean.to(mu)) / self.latents_std.to(mu)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.latents_std.to(latents) + self.latents_mean.to(latents)

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``uint8 [B, T, H, W, 3]`` -> float32 normalised latents ``[B, F, C, h, w]``."""
        frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
        if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [B, T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        _, t, h, w, _ = frames.shape
        self._check(t, h, w)
        pixels = frames.to(self.device, torch.float32) / 127.5 - 1.0
        pixels = pixels.permute(0, 4, 1, 2, 3).to(self.dtype)  # [B, 3, T, H, W]
        mu = self.vae.encode(pixels).latent_dist.mode()  # [B, C, F, h, w]
        return self.normalize(mu.float().permute(0, 2, 1, 3, 4)).contiguous()

    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, F, C, h, w]`` -> float frames ``[B, T, H, W, 3]`` in ``[-1, 1]``."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"latents must be [B, F, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        mu = self.denormalize(latents.float()).permute(0, 2, 1, 3, 4).to(self.device, self.dtype)
        pixels = self.vae.decode(mu).sample  # [B, 3, T, H, W]
        return pixels.float().permute(0, 2, 3, 4, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents ``[B, F, C, h, w]`` -> ``uint8 [B, T, H, W, 3]``."""
        pixels = self.to_pixels(latents.detach()).cpu()
        return ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, config: dict | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", fps: float = WAN_FPS) -> WanVideoCodec:
        """A diffusers VAE directory, a pipeline directory with ``vae/``, or a weights file.

        A weights file (``Wan2.1_VAE.pth`` in Wan's names, or a ``.safetensors`` in either naming) is
        loaded into ``AutoencoderKLWan(**config)``; the default config is Wan2.1's VAE.
        """
        path = Path(path)
        if path.is_dir() and (path / "vae").is_dir():
            path = path / "vae"
        if path.is_dir() and (path / "config.json").is_file():
            vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
            return cls(vae.to(device), fps)
        if path.is_dir():
            path = path / WAN_VAE_FILE
        state = load_file(path, device="cpu") if path.suffix == ".safetensors" else torch_load_tensors(path)
        if any(marker in state for marker in _ORIGINAL_VAE_MARKERS):
            state = convert_wan_vae_to_diffusers(state)
        vae = AutoencoderKLWan(**(config or {}))
        check_state_matches(vae, state, str(path))
        vae.load_state_dict(state, strict=True)
        logger.info("loaded Wan VAE %s", path)
        return cls(vae.to(device=device, dtype=dtype), fps)
