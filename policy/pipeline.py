"""The streaming video policy: transformer, text encoder, codec, sampler and the video geometry.

``TextEncoder`` and ``VideoCodec`` are the protocols other packages implement (the umT5 and Wan VAE
wrappers, the pocket world's tiny encoder and codec). Text conditionings are cached by
``prompt_key`` (a hash of the prompt and the encoder id).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from policy.attention import check_window
from policy.kv_cache import KVCache
from policy.sampler import SamplerConfig
from policy.transformer_causal_wan import CausalWanTransformer3DModel


@runtime_checkable
class TextEncoder(Protocol):
    encoder_id: str

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``[B, S, D_text]`` float tensor, zero past each prompt's length."""
        ...


@runtime_checkable
class VideoCodec(Protocol):
    fps: float

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents ``[B, F, C, H, W]`` -> ``uint8`` frames ``[B, T, H, W, 3]``."""
        ...

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """``uint8`` frames ``[B, T, H, W, 3]`` -> latents ``[B, F, C, H, W]``."""
        ...


def prompt_key(prompt: str, encoder_id: str) -> str:
    """Stable key of a text conditioning: the prompt under one specific encoder."""
    return hashlib.sha256(f"{encoder_id}\x00{prompt}".encode()).hexdigest()[:32]


@dataclass
class StreamingVideoPolicy:
    transformer: CausalWanTransformer3DModel
    sampler: SamplerConfig
    frames_per_chunk: int
    num_chunks: int
    latent_shape: tuple[int, int, int]  # (C, H, W) of one latent frame
    text_encoder: TextEncoder | None = None
    codec: VideoCodec | None = None
    local_window: int | None = None
    sink_frames: int = 0
    # With a local window, a group forked past the first window re-caches there (policy.recache) so the
    # learner rebuilds its context from the sink and the last window frames, not the whole prefix.
    recache_at_pivot: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    max_cached_prompts: int = 1024
    _text_cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.latent_shape = tuple(int(s) for s in self.latent_shape)
        if self.frames_per_chunk < 1 or self.num_chunks < 1:
            raise ValueError(f"frames_per_chunk={self.frames_per_chunk} and num_chunks={self.num_chunks} must be >= 1")
        cfg = self.transformer.config
        if self.latent_shape[0] != cfg.in_channels:
            raise ValueError(f"latent_shape channels {self.latent_shape[0]} != transformer in_channels {cfg.in_channels}")
        self.transformer.tokens_per_frame(*self.latent_shape[1:])  # checks patch divisibility
        check_window(self.frames_per_chunk, self.local_window, self.sink_frames)

    # --------------------------------------------------------------------------- geometry
    @property
    def num_frames(self) -> int:
        return self.frames_per_chunk * self.num_chunks

    @property
    def tokens_per_frame(self) -> int:
        return self.transformer.tokens_per_frame(*self.latent_shape[1:])

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    def timesteps(self, chunk: int | None = None) -> torch.Tensor:
        """``[T_chunk]``: chunk 0 may have a step list of its own (``SamplerConfig.first_chunk_step_list``)."""
        return self.sampler.timesteps(self.device, chunk)

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return KVCache.for_model(
            self.transformer,
            batch_size,
            self.num_frames,
            self.tokens_per_frame,
            self.local_window,
            self.sink_frames,
            dtype=self.dtype,
            device=self.device,
        )

    # ------------------------------------------------------------------------------- text
    @property
    def encoder_id(self) -> str:
        if self.text_encoder is None:
            raise RuntimeError("this policy has no text encoder")
        return self.text_encoder.encoder_id

    def prompt_key(self, prompt: str) -> str:
        return prompt_key(prompt, self.encoder_id)

    def text_conditioning(self, prompts: list[str]) -> torch.Tensor:
        """``[B, S, D_text]`` on the policy's device, each prompt encoded once and cached."""
        missing = [p for p in dict.fromkeys(prompts) if self.prompt_key(p) not in self._text_cache]
        if missing:
            with torch.no_grad():
                encoded = self.text_encoder.encode(missing)
            for prompt, cond in zip(missing, encoded):
                self._text_cache[self.prompt_key(prompt)] = cond.to(self.device, self.dtype)
        rows = []
        for prompt in prompts:
            key = self.prompt_key(prompt)
            self._text_cache.move_to_end(key)
            rows.append(self._text_cache[key])
        while len(self._text_cache) > self.max_cached_prompts:
            self._text_cache.popitem(last=False)
        return torch.stack(rows)

    # ------------------------------------------------------------------------------ video
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        if self.codec is None:
            raise RuntimeError("this policy has no codec")
        return self.codec.decode(latents)

    @property
    def fps(self) -> float:
        if self.codec is None:
            raise RuntimeError("this policy has no codec")
        return self.codec.fps
