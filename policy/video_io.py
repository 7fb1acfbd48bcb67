"""Writing decoded videos for people: MP4 (GIF where no encoder is available), labelled grid MP4s and contact-sheet PNGs."""

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
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Lay out a matplotlib figure, write it as a PNG (parents created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def grid_video(
    videos: list[np.ndarray], labels: list[str], path: str | Path, fps: float, columns: int | None = None,
    min_cell_width: int = 192,
) -> Path:
    """Several videos tiled into one MP4, each under its label (e.g. the prompt); shorter videos hold their
    last frame. Small videos are upscaled so a cell is at least `min_cell_width` pixels wide."""
    if len(videos) != len(labels):
        raise ValueError(f"{len(videos)} videos but {len(labels)} labels")
    if not videos:
        raise ValueError("no video to put in a grid")
    shapes = {np.asarray(v).shape[1:] for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"videos of one grid must share their frame size, got {sorted(shapes)}")
    width = shapes.pop()[1]
    upscale = max(1, -(-min_cell_width // width))
    cells = [_labelled(_upscaled(np.asarray(v), upscale), label) for v, label in zip(videos, labels)]
    length = max(len(c) for c in cells)
    cells = [np.concatenate([c, np.repeat(c[-1:], length - len(c), axis=0)]) if len(c) < length else c for c in cells]
    columns = columns or int(np.ceil(np.sqrt(len(cells))))
    blank = np.full_like(cells[0], 255)
    cells += [blank] * (-len(cells) % columns)
    gap = 2
    rows = [_join([cells[i + j] for j in range(columns)], axis=2, gap=gap) for i in range(0, len(cells), columns)]
    grid = _join(rows, axis=1, gap=gap)
    # H.264 in yuv420p needs even sides.
    grid = np.pad(grid, ((0, 0), (0, grid.shape[1] % 2), (0, grid.shape[2] % 2), (0, 0)), constant_values=255)
    return write_video(grid, fps, path)


def _join(parts: list[np.ndarray], axis: int, gap: int) -> np.ndarray:
    shape = list(parts[0].shape)
    shape[axis] = gap
    spacer = np.full(shape, 255, np.uint8)
    pieces = [p for part in parts for p in (part, spacer)][:-1]
    return np.concatenate(pieces, axis=axis)


def _labelled(frames: np.ndarray, label: str, line_height: int = 12, max_lines: int = 2) -> np.ndarray:
    """`frames` [T, H, W, 3] under a white strip with `label` wrapped to the width (at most `max_lines`)."""
    import textwrap

    from PIL import Image, ImageDraw

    width = frames.shape[2]
    lines = textwrap.wrap(label, width=max(8, width // 6), max_lines=max_lines, placeholder="...") or [""]
    strip = Image.new("RGB", (width, line_height * max_lines + 4), "white")
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((2, 2 + i * line_height), line, fill="black")
    strip = np.broadcast_to(np.asarray(strip), (len(frames), *np.asarray(strip).shape))
    return np.concatenate([strip, frames], axis=1)
