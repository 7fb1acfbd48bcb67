"""The pocket codec: a fixed linear "VAE" between frames and latents, fit by PCA to domain videos.

A video ``uint8 [T, H, W, 3]`` is scaled to ``[-1, 1]`` and cut into blocks of ``space_stride^2`` pixels x
RGB (4 x 4 x 3 = 48 values) per frame. Each block is projected on the ``components`` leading principal
components of such blocks in real domain videos (8 by default), each coefficient is normalised by its
standard deviation over those videos and multiplied by ``scale`` (as Wan's VAE normalises its latents),
and the coefficients of ``time_stride`` consecutive frames are stacked as channels (frame-major). A
16-frame 32x32 video becomes latents ``[8, 16, 8, 8]``: Wan's 16 latent channels, 2x temporal and 4x
spatial compression, 16 tokens per latent frame after the transformer's ``(1, 2, 2)`` patch and 64
values per token (Wan: 16 x 2 x 2 = 64). Every frame has the same spatial basis: a basis over
two-frame blocks would reconstruct the two frames of a pair differently and make objects zigzag.

Why a compressing codec: the transformer predicts the flow ``v`` and the sampler forms
``x0 = x_t - sigma v``, so at ``sigma = 1`` the network must reproduce its input noise to the last value;
a token of raw pixels (384 values) cannot pass through a 128-wide residual stream, a 64-value token can.
Why PCA: fixed, linear (``decode`` is the transpose), deterministic and cheap; decoding a real video's
latents loses a little (mean absolute error about 2/255, soft edges with a faint halo), as a VAE does.

``scale`` sets the signal-to-noise ratio the sampler's timesteps meet. Noising ``scale * z`` at
``sigma`` equals noising ``z`` on a schedule with ``shift / scale``: with the pocket sampler's shift 1
the scale 2.5 acts as shift 0.4 on unit-scale latents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pocket import domain

CODEC_FILE = "codec.safetensors"


class PocketCodec:
    def __init__(
        self,
        basis: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        time_stride: int = 2,
        space_stride: int = 4,
        scale: float = 1.0,
        fps: float = domain.FPS,
    ) -> None:
        block = space_stride**2 * 3
        if basis.ndim != 2 or basis.shape[1] != block or mean.shape != (block,) or std.shape != (basis.shape[0],):
            raise ValueError(
                f"codec tensors do not fit blocks of {block} values: basis {tuple(basis.shape)}, "
                f"mean {tuple(mean.shape)}, std {tuple(std.shape)}"
            )
        if time_stride < 1 or not scale > 0 or not bool((std > 0).all()):
            raise ValueError("codec time_stride must be >= 1, and its scale and every component std positive")
        self.basis, self.mean, self.std = basis.float(), mean.float(), std.float()
        self.time_stride, self.space_stride = time_stride, space_stride
        self.scale = float(scale)
        self.fps = float(fps)

    @property
    def latent_channels(self) -> int:
        return self.time_stride * self.basis.shape[0]

    def _check(self, t: int, h: int, w: int) -> None:
        if t % self.time_stride or h % self.space_stride or w % self.space_stride:
            raise ValueError(
                f"video of {t} frames at {h}x{w} is not divisible by time_stride={self.time_stride} "
                f"and space_stride={self.space_stride}"
            )

    def to_blocks(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, T, H, W, 3]`` -> blocks ``[B, T, h, w, s*s*3]`` (order: row, column, RGB)."""
        b, t, h, w, _ = pixels.shape
        self._check(t, h, w)
        s = self.space_stride
        x = pixels.reshape(b, t, h // s, s, w // s, s, 3).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, h // s, w // s, -1)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        b, t, h, w, _ = blocks.shape
        s = self.space_stride
        return blocks.reshape(b, t, h, w, s, s, 3).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, t, h * s, w * s, 3)

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """``uint8 [B, T, H, W, 3]`` -> float32 latents ``[B, F, C, h, w]``."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [B, T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        pixels = torch.from_numpy(frames.astype(np.float32) / 127.5 - 1.0)
        coeffs = (self.to_blocks(pixels) - self.mean) @ self.basis.T / self.std * self.scale  # [B, T, h, w, k]
        b, t, h, w, k = coeffs.shape
        ts = self.time_stride
        return coeffs.reshape(b, t // ts, ts, h, w, k).permute(0, 1, 2, 5, 3, 4).reshape(b, t // ts, ts * k, h, w).contiguous()

    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, F, C, h, w]`` -> float frames ``[B, T, H, W, 3]`` in about ``[-1, 1]`` (unclamped, differentiable)."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"latents must be [B, F, {self.latent_channels}, h, w] for this codec, got {tuple(latents.shape)}"
            )
        b, f, _, h, w = latents.shape
        ts, k = self.time_stride, self.basis.shape[0]
        coeffs = latents.reshape(b, f, ts, k, h, w).permute(0, 1, 2, 4, 5, 3).reshape(b, f * ts, h, w, k)
        coeffs = coeffs / self.scale * self.std.to(latents)
        return self.from_blocks(coeffs @ self.basis.to(latents) + self.mean.to(latents))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents ``[B, F, C, h, w]`` -> ``uint8 [B, T, H, W, 3]`` (values outside ``[-1, 1]`` are clipped)."""
        pixels = self.to_pixels(latents.detach().float().cpu())
        return ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()

    # ----------------------------------------------------------------------------- storage
    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CODEC_FILE
        meta = {"time_stride": str(self.time_stride), "space_stride": str(self.space_stride), "scale": repr(self.scale)}
        save_file({"basis": self.basis.contiguous(), "mean": self.mean, "std": self.std}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, directory: str | Path, fps: float = domain.FPS) -> PocketCodec:
        from safetensors import safe_open

        path = Path(directory) / CODEC_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the pocket codec is written by `python -m pocket.train`")
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        missing = sorted(({"basis", "mean", "std"} - set(tensors)) | ({"time_stride", "space_stride", "scale"} - set(meta)))
        if missing:
            raise ValueError(f"{path} lacks {missing}")
        return cls(tensors["basis"], tensors["mean"], tensors["std"], int(meta["time_stride"]), int(meta["space_stride"]),
                   float(meta["scale"]), fps)


def fit_codec(
    videos: np.ndarray,
    components: int = 8,
    time_stride: int = 2,
    space_stride: int = 4,
    scale: float = 1.0,
) -> PocketCodec:
    """PCA of the per-frame blocks of ``videos`` (uint8 ``[N, T, H, W, 3]``), in float64; each basis
    vector's sign is fixed so that its largest-magnitude entry is positive (the fit is then a function
    of the videos alone)."""
    block = space_stride**2 * 3
    probe = PocketCodec(torch.zeros(1, block), torch.zeros(block), torch.ones(1), time_stride, space_stride)
    pixels = torch.from_numpy(np.asarray(videos).astype(np.float64) / 127.5 - 1.0)
    blocks = probe.to_blocks(pixels).reshape(-1, block)
    mean = blocks.mean(0)
    _, _, vt = torch.linalg.svd(blocks - mean, full_matrices=False)
    basis = vt[:components]
    basis = basis * torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    std = ((blocks - mean) @ basis.T).std(0)
    return PocketCodec(basis.float(), mean.float(), std.float(), time_stride, space_stride, scale)
