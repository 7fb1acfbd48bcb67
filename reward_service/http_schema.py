"""The plain HTTP scoring API a reward server speaks (served by `reward_service.serve`, spoken by the
`http` reward's `score` dialect), as pydantic records, and the video codec of its requests.

    GET  {url}/info    -> ServerInfo      {"model": "pocket", "heads": ["VQ", "MQ", "TA"]}
    POST {url}/score   ScoreRequest       {"prompts": [...], "videos": [VideoPayload, ...]}
                       -> ScoreResponse   {"heads": [...], "scores": {head: [float | null]}, "errors": [str | null]}

A video is sent as raw uint8 frames (`format: "frames"`, `shape: [T, H, W, 3]`, base64 of the
C-order bytes: exact) or as an H.264 MP4 file (`format: "mp4"`, base64 of the file: lossy, and
21x smaller on 32x32 pocket videos, 470x on a smooth 33x240x416 clip, 4x on pure noise). A score the server could not compute is `null` (JSON has no NaN), and `errors[i]`
then says why; the client turns both into an invalid reward for that video.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import tempfile
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from reward_service.base import Video


class VideoPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["frames", "mp4"]
    data: str  # base64: the frames' raw bytes, or the MP4 file
    fps: float = Field(gt=0)
    shape: tuple[int, int, int, int] | None = None  # [T, H, W, 3]; "frames" only

    @model_validator(mode="after")
    def _shape_fits_format(self) -> VideoPayload:
        if self.format == "frames":
            if self.shape is None or self.shape[-1] != 3 or min(self.shape) < 1:
                raise ValueError(f"a 'frames' video needs shape [T, H, W, 3] with positive sizes, got {self.shape}")
        elif self.shape is not None:
            raise ValueError("an 'mp4' video carries no shape (the file has it)")
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str]
    videos: list[VideoPayload]

    @model_validator(mode="after")
    def _one_prompt_per_video(self) -> ScoreRequest:
        if len(self.prompts) != len(self.videos):
            raise ValueError(f"got {len(self.videos)} videos but {len(self.prompts)} prompts")
        return self


class ScoreResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heads: list[str]
    scores: dict[str, list[float | None]]  # head -> one value per video, null where not scored
    errors: list[str | None] | None = None  # per video: why it could not be scored

    @model_validator(mode="after")
    def _consistent(self) -> ScoreResponse:
        if set(self.scores) != set(self.heads):
            raise ValueError(f"scores hold heads {sorted(self.scores)} but heads lists {self.heads}")
        lengths = {len(v) for v in self.scores.values()} | ({len(self.errors)} if self.errors is not None else set())
        if len(lengths) > 1:
            raise ValueError(f"scores and errors differ in length: {sorted(lengths)}")
        return self

    def __len__(self) -> int:
        return len(next(iter(self.scores.values()))) if self.scores else len(self.errors or [])


class ServerInfo(BaseModel):
    model: str
    heads: list[str]


def scores_response(heads: tuple[str, ...], values: dict[str, list[float]], errors: list[str | None]) -> ScoreResponse:
    """A response from float scores: non-finite values become null."""
    return ScoreResponse(
        heads=list(heads),
        scores={h: [float(v) if math.isfinite(v) else None for v in values[h]] for h in heads},
        errors=errors,
    )


def encode_video(video: Video, fmt: Literal["frames", "mp4"]) -> VideoPayload:
    if fmt == "frames":
        frames = np.ascontiguousarray(video.frames)
        data = base64.b64encode(frames.tobytes()).decode("ascii")
        return VideoPayload(format="frames", data=data, fps=video.fps, shape=tuple(frames.shape))
    return VideoPayload(format="mp4", data=base64.b64encode(mp4_bytes(video)).decode("ascii"), fps=video.fps)


def decode_video(payload: VideoPayload) -> Video:
    """The Video a payload carries; ValueError saying what is wrong with it otherwise."""
    try:
        raw = base64.b64decode(payload.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"video data is not valid base64: {exc}") from exc
    if payload.format == "frames":
        expected = math.prod(payload.shape)
        if len(raw) != expected:
            raise ValueError(f"frames of shape {list(payload.shape)} need {expected} bytes, got {len(raw)}")
        return Video(np.frombuffer(raw, dtype=np.uint8).reshape(payload.shape).copy(), payload.fps)
    return Video(mp4_frames(raw), payload.fps)


def mp4_bytes(video: Video) -> bytes:
    """H.264 MP4 (yuv420p needs even sides: odd ones are padded by repeating the edge)."""
    import imageio.v3 as iio

    frames = video.frames
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return iio.imwrite("<bytes>", frames, extension=".mp4", fps=video.fps, codec="libx264", macro_block_size=1)


def mp4_frames(data: bytes) -> np.ndarray:
    import imageio.v3 as iio

    # The ffmpeg reader wants a file it can seek; a temporary one holds the upload.
    fd, path = tempfile.mkstemp(suffix=".mp4")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        frames = iio.imread(path)
    except Exception as exc:
        raise ValueError(f"cannot decode the MP4 video: {type(exc).__name__}: {exc}") from exc
    finally:
        os.unlink(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"the MP4 decoded to {frames.dtype} {frames.shape}, not RGB frames")
    return np.ascontiguousarray(frames)
