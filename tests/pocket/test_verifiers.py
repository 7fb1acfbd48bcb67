"""Verifier rewards on ground-truth videos and controlled defects."""

from __future__ import annotations

import numpy as np
import pytest

from pocket import corruptions, domain, verifiers
from reward_service.base import Video
from reward_service.registry import build_reward

CASES = [(domain.heldout_prompts()[i], i) for i in (0, 13, 29, 40, 58, 71)]


@pytest.fixture(scope="module")
def real_scores():
    return {(p, s): verifiers.score_video(domain.generate_video(p, s), p) for p, s in CASES}


def test_real_videos_score_near_the_top(real_scores):
    for scores in real_scores.values():
        assert min(scores.values()) > 0.9, scores


@pytest.mark.parametrize(
    "defect, head",
    [
        (corruptions.wrong_colour, "TA"),
        (corruptions.wrong_direction, "TA"),
        (corruptions.wrong_count, "TA"),
        (corruptions.wrong_shape, "TA"),
        (corruptions.jittered, "MQ"),
        (lambda p, s: corruptions.flickering(domain.generate_video(p, s), seed=s), "MQ"),
        (lambda p, s: corruptions.blurred(domain.generate_video(p, s), 1.0), "VQ"),
        (lambda p, s: corruptions.noisy(domain.generate_video(p, s), 12.0, seed=s), "VQ"),
    ],
)
def test_a_defect_lowers_the_head_that_should_see_it(defect, head, real_scores):
    for prompt, seed in CASES:
        bad = verifiers.score_video(defect(prompt, seed), prompt)
        assert bad[head] < real_scores[(prompt, seed)][head] - 0.15, (prompt, bad)


def test_heads_are_graded_in_the_size_of_the_defect():
    prompt, seed = CASES[2]
    real = domain.generate_video(prompt, seed)
    vq = [verifiers.score_video(corruptions.blurred(real, s), prompt)["VQ"] for s in (0.4, 0.8, 1.6)]
    vq_noise = [verifiers.score_video(corruptions.noisy(real, s, seed=1), prompt)["VQ"] for s in (2.0, 6.0, 18.0)]
    mq = [verifiers.score_video(corruptions.jittered(prompt, seed, px), prompt)["MQ"] for px in (0.3, 0.8, 2.0)]
    for values in (vq, vq_noise, mq):
        assert values[0] > values[1] > values[2], values
        assert 0.0 < values[1] < 1.0


def test_scores_are_deterministic_and_in_range():
    videos = [corruptions.noisy(domain.generate_video(p, s), 8.0, seed=s) for p, s in CASES]
    prompts = [p for p, _ in CASES]
    a, b = verifiers.score_videos(videos, prompts), verifiers.score_videos(videos, prompts)
    for head in verifiers.HEADS:
        assert a[head].dtype == np.float64 and a[head].shape == (len(CASES),)
        assert np.array_equal(a[head], b[head])
        assert ((a[head] >= 0) & (a[head] <= 1)).all()


def _flood_fill_count(mask: np.ndarray) -> int:
    """Independent 8-connected component count by depth-first search."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return count


def test_blob_labelling_matches_a_flood_fill():
    masks = np.random.default_rng(0).random((6, 20, 20)) < 0.3
    labels = verifiers.label_blobs(masks)
    for t in range(len(masks)):
        assert len(np.unique(labels[t][labels[t] >= 0])) == _flood_fill_count(masks[t])
        assert ((labels[t] >= 0) == masks[t]).all()


def test_registered_reward_scores_like_the_verifiers_and_nans_what_it_cannot_score():
    model = build_reward("pocket")
    assert model.name == "pocket" and model.heads == ("VQ", "MQ", "TA")
    prompts = [p for p, _ in CASES[:2]] + ["a dragon flying over mountains"]
    frames = [domain.generate_video(p, s) for p, s in CASES[:2]] + [domain.generate_video(CASES[0][0], 0)]
    out = model.score([Video(f, domain.FPS) for f in frames], prompts)
    expected = verifiers.score_videos(frames[:2], prompts[:2])
    for head in model.heads:
        assert out[head].dtype == np.float64
        assert np.array_equal(out[head][:2], expected[head])
        assert np.isnan(out[head][2])
    assert "pocket grammar" in model.last_errors[2]
    with pytest.raises(ValueError, match="no configuration"):
        build_reward("pocket", device="cuda")
