"""The out-of-domain metric: Frechet distance of fixed video features to real domain videos."""

from __future__ import annotations

import numpy as np
import pytest

from pocket import corruptions, domain, ood_metric

PROMPTS = domain.heldout_prompts()[::2]  # 36 prompts


def _frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Independent route: tr sqrt(S_a S_b) from the eigenvalues of the (non-symmetric) product."""
    scale = np.where(b.std(0) > 1e-8, b.std(0), 1.0)
    a, b = a / scale, b / scale
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(ca @ cb)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def test_frechet_distance_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(0.5, 1.0, size=(300, 6)) @ rng.normal(size=(6, 6))
    assert ood_metric.frechet_distance(a, b) == pytest.approx(_frechet_reference(a, b), rel=1e-6, abs=1e-8)
    assert ood_metric.frechet_distance(b, b) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def reference_features():
    return ood_metric.video_features(ood_metric.reference_videos(PROMPTS, per_prompt=2))


def test_features_are_fixed_and_shaped():
    videos = np.stack([domain.generate_video(p, 0) for p in PROMPTS[:3]])
    a, b = ood_metric.video_features(videos), ood_metric.video_features(videos)
    assert a.shape == (3, 64) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="uint8"):
        ood_metric.video_features(videos.astype(np.float32))


def test_real_videos_are_near_zero_and_defects_are_far(reference_features):
    real = ood_metric.video_features(np.stack([domain.generate_video(p, 7 + k) for p in PROMPTS for k in range(2)]))
    base = ood_metric.frechet_distance(real, reference_features)
    defects = {
        "blurred": [corruptions.blurred(domain.generate_video(p, 7 + k), 0.7) for p in PROMPTS for k in range(2)],
        "noisy": [corruptions.noisy(domain.generate_video(p, 7 + k), 6.0, seed=k) for p in PROMPTS for k in range(2)],
        "jittered": [corruptions.jittered(p, 7 + k) for p in PROMPTS for k in range(2)],
    }
    assert base < 2.0
    for name, videos in defects.items():
        distance = ood_metric.frechet_distance(ood_metric.video_features(np.stack(videos)), reference_features)
        assert distance > 10 * base, (name, distance, base)
