"""The interface every reward model implements, and the video type it scores."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Video:
    """Decoded frames of one video: uint8 [T, H, W, 3] at `fps` frames per second."""

    frames: np.ndarray
    fps: float

    def __post_init__(self) -> None:
        f = self.frames
        if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
            raise ValueError(f"Video.frames must be uint8 [T, H, W, 3], got {f.dtype} {tuple(f.shape)}")
        if not self.fps > 0:
            raise ValueError(f"Video.fps must be positive, got {self.fps}")


class RewardModel(abc.ABC):
    """A scorer with named heads. `score` returns one float64 array of shape (N,) per head.

    A sample the model cannot score is NaN in every head; callers treat NaN/inf as invalid.
    """

    name: str
    heads: tuple[str, ...]

    @abc.abstractmethod
    def score(self, videos: list[Video], prompts: list[str]) -> dict[str, np.ndarray]:
        ...
