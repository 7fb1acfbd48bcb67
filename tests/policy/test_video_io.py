"""The labelled grid MP4 of held-out samples, read back with the same codec library."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from policy.video_io import grid_video


def _video(t, value, rng):
    base = np.full((t, 16, 24, 3), value, np.uint8)
    return np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def test_grid_video_tiles_the_videos_under_their_labels(tmp_path):
    rng = np.random.default_rng(0)
    videos = [_video(6, 40, rng), _video(4, 200, rng), _video(6, 120, rng)]
    path = grid_video(videos, ["a red ball rolls", "a blue cube", "a long prompt " * 10], tmp_path / "g.mp4", fps=8)
    frames = iio.imread(path)
    # 3 videos: 2 columns x 2 rows; cells 24 px wide upscaled 8x to 192, under a 28 px label strip.
    cell_h, cell_w, strip = 16 * 8, 24 * 8, 28
    assert frames.shape == (6, 2 * (strip + cell_h) + 2, 2 * cell_w + 2, 3)
    for index, (video, top, left) in enumerate([(videos[0], 0, 0), (videos[1], 0, cell_w + 2), (videos[2], strip + cell_h + 2, 0)]):
        for t in range(6):
            src = video[min(t, len(video) - 1)].repeat(8, 0).repeat(8, 1).astype(float)  # shorter videos hold their last frame
            got = frames[t, top + strip : top + strip + cell_h, left : left + cell_w].astype(float)
            assert abs(got.mean() - src.mean()) < 4, (index, t)
        label = frames[0, top + 2 : top + strip - 2, left : left + cell_w]
        assert (label < 100).any() and label.mean() > 180, f"label of video {index} not drawn on white"
    assert frames[:, -cell_h:, -cell_w:].mean() > 240  # the empty fourth cell stays white


def test_grid_video_refuses_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        grid_video([np.zeros((2, 8, 8, 3), np.uint8)], [], tmp_path / "g.mp4", fps=8)
    with pytest.raises(ValueError, match="frame size"):
        grid_video([np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 16, 3), np.uint8)], ["a", "b"], tmp_path / "g.mp4", fps=8)
