"""Before/after contact sheets: the same prompts and seeds under two policies, side by side, each
sample's reward heads written under it (what a person opens first to see what training changed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policy.video_io import filmstrip, save_figure


@dataclass(frozen=True)
class Cell:
    strip: np.ndarray  # uint8 [H, W, 3]: the video's filmstrip
    caption: str  # the sample's scores


def score_caption(scores: Mapping[str, float], heads: Sequence[str] | None = None) -> str:
    """`TA 0.781  VQ 0.418  MQ 0.493` (heads in the given order, or the mapping's)."""
    names = list(heads) if heads is not None else list(scores)
    missing = [h for h in names if h not in scores]
    if missing:
        raise KeyError(f"scores lack heads {missing} (have {sorted(scores)})")
    return "  ".join(f"{h} {float(scores[h]):.3f}" for h in names)


def comparison_layout(
    before: Sequence[np.ndarray],
    after: Sequence[np.ndarray],
    before_scores: Sequence[Mapping[str, float]],
    after_scores: Sequence[Mapping[str, float]],
    heads: Sequence[str] | None = None,
    frames_per_row: int = 8,
    upscale: int = 2,
) -> list[tuple[Cell, Cell]]:
    """One row per sample: (before cell, after cell). Row k pairs video k of each list, which must be
    the same (prompt, seed) under the two policies."""
    n = len(before)
    if not (len(after) == len(before_scores) == len(after_scores) == n):
        raise ValueError(
            f"need as many videos and scores before and after: {n} / {len(after)} videos, "
            f"{len(before_scores)} / {len(after_scores)} scores"
        )
    if n == 0:
        raise ValueError("no video to compare")
    return [
        (Cell(filmstrip(b, frames_per_row, upscale), score_caption(sb, heads)),
         Cell(filmstrip(a, frames_per_row, upscale), score_caption(sa, heads)))
        for b, a, sb, sa in zip(before, after, before_scores, after_scores)
    ]


def comparison_sheet(
    before: Sequence[np.ndarray],
    after: Sequence[np.ndarray],
    labels: Sequence[str],
    before_scores: Sequence[Mapping[str, float]],
    after_scores: Sequence[Mapping[str, float]],
    path: str | Path,
    titles: tuple[str, str] = ("base", "trained"),
    heads: Sequence[str] | None = None,
    frames_per_row: int = 8,
    upscale: int = 2,
) -> Path:
    """A PNG: left column `before`, right column `after`; each row titled by its label (prompt and
    seed), each filmstrip captioned with its scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison_layout(before, after, before_scores, after_scores, heads, frames_per_row, upscale)
    if len(labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    height, width = rows[0][0].strip.shape[:2]
    fig, axes = plt.subplots(len(rows), 2, figsize=(2 * max(4.0, width / 60), 0.6 + 1.8 * len(rows) * height / 60),
                             squeeze=False)
    for r, ((left, right), label) in enumerate(zip(rows, labels)):
        for c, (cell, title) in enumerate(((left, titles[0]), (right, titles[1]))):
            ax = axes[r, c]
            ax.imshow(cell.strip, interpolation="nearest")
            ax.set_title(f"{title}: {label}", fontsize=8, loc="left")
            ax.text(0.0, -0.06, cell.caption, transform=ax.transAxes, fontsize=8, va="top", family="monospace")
            ax.axis("off")
    return save_figure(fig, path)
