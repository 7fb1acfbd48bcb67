"""The pocket codec: a fixed, exactly invertible space-to-depth map between frames and latents.

A video ``uint8 [T, H, W, 3]`` is scaled to ``[-scale, scale]`` and folded into latents ``[F, C, h, w]`` with
``F = T / time_stride``, ``h = H / space_stride``, ``w = W / space_stride`` and
``C = time_stride * space_stride^2 * 3`` (channel order: frame in the group, row, column, RGB). With
the defaults a 16-frame 32x32 video becomes ``[8, 96, 8, 8]``: 8 latent frames as Wan's VAE would give
for a longer clip, each patchified by the transformer's ``(1, 2, 2)`` patch into 4x4 = 16 tokens.

``scale`` sets the signal-to-noise ratio the sampler's timesteps meet. Noising ``scale * x`` at
``sigma`` equals noising ``x`` at a schedule with ``shift / scale``: the pocket preset's 2.5 turns the
Self-Forcing timesteps (shift 5, tuned for 480p) into the equivalent of shift 2 for 32x32 frames, so
a chunk's content is already legible in its input at the second step (t = 937.5).

There are no weights: it plays the VAE's role (the generator works in a compressed-looking latent
space with Wan's frame/patch geometry) while decoding is exact, so every defect of a decoded video is
the generator's own.
"""

from __future__ import annotations

import numpy as np
import torch

from policy.pocket import domain


class PocketCodec:
    def __init__(self, time_stride: int = 2, space_stride: int = 4, scale: float = 1.0, fps: float = domain.FPS) -> None:
        if time_stride < 1 or space_stride < 1:
            raise ValueError(f"strides must be >= 1, got time_stride={time_stride}, space_stride={space_stride}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self.time_stride = time_stride
        self.space_stride = space_stride
        self.fps = float(fps)

    @property
    def latent_channels(self) -> int:
        return self.time_stride * self.space_stride**2 * 3

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self._check(num_frames, height, width)
        s = self.space_stride
        return num_frames // self.time_stride, self.latent_channels, height // s, width // s

    def _check(self, t: int, h: int, w: int) -> None:
        if t % self.time_stride or h % self.space_stride or w % self.space_stride:
            raise ValueError(
                f"video of {t} frames at {h}x{w} is not divisible by time_stride={self.time_stride} "
                f"and space_stride={self.space_stride}"
            )

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """``uint8 [B, T, H, W, 3]`` -> float32 latents ``[B, F, C, h, w]`` in ``[-scale, scale]``."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [B, T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        b, t, h, w, _ = frames.shape
        self._check(t, h, w)
        ts, s = self.time_stride, self.space_stride
        x = torch.from_numpy((frames.astype(np.float32) / 127.5 - 1.0) * self.scale)
        x = x.reshape(b, t // ts, ts, h // s, s, w // s, s, 3)
        x = x.permute(0, 1, 2, 4, 6, 7, 3, 5)  # b, F, dt, dy, dx, rgb, h, w
        return x.reshape(b, t // ts, self.latent_channels, h // s, w // s).contiguous()

    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, F, C, h, w]`` -> float frames ``[B, T, H, W, 3]`` in ``[-1, 1]`` (unclamped, differentiable)."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"latents must be [B, F, {self.latent_channels}, h, w] for this codec, got {tuple(latents.shape)}"
            )
        b, f, _, h, w = latents.shape
        ts, s = self.time_stride, self.space_stride
        x = latents.reshape(b, f, ts, s, s, 3, h, w).permute(0, 1, 2, 6, 3, 7, 4, 5)
        return x.reshape(b, f * ts, h * s, w * s, 3) / self.scale

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents ``[B, F, C, h, w]`` -> ``uint8 [B, T, H, W, 3]`` (values outside ``[-1, 1]`` are clipped)."""
        pixels = self.to_pixels(latents.detach().float().cpu())
        return ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
