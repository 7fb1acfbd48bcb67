"""Writing decoded videos for people: MP4 (GIF where no encoder is available) and contact-sheet PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(frames: np.ndarray, fps: float, path: str | Path, upscale: int = 1) -> Path:
    """`frames` uint8 [T, H, W, 3] -> an MP4 (H.264 through imageio-ffmpeg) or, for a .gif path, a GIF.

    `upscale` repeats pixels (tiny videos are unreadable at their native size; codecs also want
    even dimensions of at least 16 pixels)."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    video = _upscaled(np.asarray(frames), upscale)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, video, duration=1000.0 / fps, loop=0)
    else:
        iio.imwrite(path, video, fps=fps, codec="libx264", macro_block_size=1)
    return path


def _upscaled(frames: np.ndarray, factor: int) -> np.ndarray:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if factor > 1:
        frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    return frames


def filmstrip(frames: np.ndarray, frames_per_row: int = 8, upscale: int = 2) -> np.ndarray:
    """`frames_per_row` evenly spaced frames of a video side by side, each followed by a 2-pixel white gap."""
    frames = _upscaled(np.asarray(frames), upscale)
    pick = np.linspace(0, len(frames) - 1, min(frames_per_row, len(frames))).round().astype(int)
    gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
    return np.concatenate([np.concatenate([frames[i], gap], axis=1) for i in pick], axis=1)


def contact_sheet(
    videos: list[np.ndarray], labels: list[str], path: str | Path, frames_per_row: int = 8, upscale: int = 2
) -> Path:
    """One row per video: `frames_per_row` evenly spaced frames, the label above the row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(videos) != len(labels):
        raise ValueError(f"{len(videos)} videos but {len(labels)} labels")
    if not videos:
        raise ValueError("no video to put on a contact sheet")
    rows = [filmstrip(frames, frames_per_row, upscale) for frames in videos]
    width = max(r.shape[1] for r in rows)
    fig_w = max(4.0, width / 60)
    fig, axes = plt.subplots(len(rows), 1, figsize=(fig_w, 1.0 + 1.3 * len(rows) * rows[0].shape[0] / 60), squeeze=False)
    for ax, row, label in zip(axes[:, 0], rows, labels):
        ax.imshow(row, interpolation="nearest")
        ax.set_title(label, fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
