"""The before/after sheet: row k pairs video k of each policy, captions carry each sample's scores."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from policy.video_compare import comparison_layout, comparison_sheet, score_caption


def _video(value: int, frames: int = 16) -> np.ndarray:
    v = np.zeros((frames, 4, 6, 3), np.uint8)
    v[:, :, :, 0] = value
    v[:, :, :, 1] = np.arange(frames)[:, None, None]  # frame index, to see which frames were picked
    return v


def test_caption_lists_the_heads_in_order():
    assert score_caption({"VQ": 0.4, "TA": 0.78125, "MQ": 0.5}, heads=["TA", "VQ", "MQ"]) == "TA 0.781  VQ 0.400  MQ 0.500"
    with pytest.raises(KeyError, match="MQ"):
        score_caption({"TA": 0.5}, heads=["TA", "MQ"])


def test_layout_pairs_the_same_sample_before_and_after():
    before, after = [_video(10), _video(20)], [_video(110), _video(120)]
    scores_b = [{"TA": 0.1, "VQ": 0.2, "MQ": 0.3}, {"TA": 0.4, "VQ": 0.5, "MQ": 0.6}]
    scores_a = [{"TA": 0.7, "VQ": 0.8, "MQ": 0.9}, {"TA": 1.0, "VQ": 0.0, "MQ": 0.5}]
    rows = comparison_layout(before, after, scores_b, scores_a, heads=["TA", "VQ", "MQ"], frames_per_row=4, upscale=2)
    assert len(rows) == 2
    for k, (left, right) in enumerate(rows):
        # 4 frames of 6 px upscaled 2x, each followed by a 2 px gap; 4 px high upscaled 2x
        assert left.strip.shape == right.strip.shape == (8, 4 * (12 + 2), 3)
        assert left.strip[0, 0, 0] == before[k][0, 0, 0, 0] and right.strip[0, 0, 0] == after[k][0, 0, 0, 0]
        # evenly spaced frames 0, 5, 10, 15 of 16
        assert [int(left.strip[0, j * 14, 1]) for j in range(4)] == [0, 5, 10, 15]
        assert left.caption == score_caption(scores_b[k], ["TA", "VQ", "MQ"])
        assert right.caption == score_caption(scores_a[k], ["TA", "VQ", "MQ"])
    with pytest.raises(ValueError, match="as many videos"):
        comparison_layout(before, after[:1], scores_b, scores_a)


def test_sheet_is_two_columns_wide(tmp_path):
    videos = [_video(40 * k) for k in range(3)]
    scores = [{"TA": 0.5, "VQ": 0.5, "MQ": 0.5}] * 3
    path = comparison_sheet(videos, videos, ["a", "b", "c"], scores, scores, tmp_path / "s.png", frames_per_row=8, upscale=8)
    width, height = Image.open(path).size
    assert width > 2 * 8 * (6 * 8)  # two filmstrips of 8 frames, each 48 px wide at this upscale
    with pytest.raises(ValueError, match="labels"):
        comparison_sheet(videos, videos, ["a"], scores, scores, tmp_path / "t.png")
