"""The pocket world's out-of-domain quality metric: a Frechet distance to real domain videos (lower is better).

It plays the role VBench plays in the paper: alignment never optimises it, so a policy that games the
verifiers (oversaturated colours, frozen or oversized objects, smeared frames) moves its videos away
from the real distribution and this number goes up while the rewards go up.

Features of one video (``D = 64``), all fixed (no training, no data-dependent constants):

- 32 from a random 3-D conv net (three 3x3x3 convolutions with ReLU, strides (1,2,2), (2,2,2),
  (2,2,2), widths 16/32/32, weights drawn once from ``numpy.random.default_rng(1234)`` with He scaling;
  spatio-temporal mean of the last layer), in the spirit of FVD's learned features;
- 24 colour-histogram fractions (8 bins per RGB channel over all pixels);
- 4 edge statistics (mean and standard deviation over frames of the mean spatial gradient magnitude,
  90th percentile of gradient magnitude, fraction of pixels with gradient > 0.25);
- 4 temporal statistics (mean absolute frame difference at lags 1, 2 and 4; standard deviation over
  frames of the mean brightness).

``frechet_distance(generated, reference)`` standardises every feature by the reference set's standard
deviation, then computes ``|mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2))``. ``pocket_fvd`` compares
videos generated for the held-out prompts with real videos of the same prompts drawn from fixed seeds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pocket import domain

FEATURE_SEED = 1234
REFERENCE_SEED_BASE = 1_000_000
_CONV_SPECS = ((3, 16, (1, 2, 2)), (16, 32, (2, 2, 2)), (32, 32, (2, 2, 2)))


def _conv_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(FEATURE_SEED)
    return [rng.standard_normal((cout, cin, 3, 3, 3)) * np.sqrt(2.0 / (cin * 27)) for cin, cout, _ in _CONV_SPECS]


_WEIGHTS = _conv_weights()


def conv_features(videos: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(videos.astype(np.float64).transpose(0, 4, 1, 2, 3) / 127.5 - 1.0)  # [N, 3, T, H, W]
    with torch.no_grad():
        for w, (_, _, stride) in zip(_WEIGHTS, _CONV_SPECS):
            x = torch.relu(F.conv3d(x, torch.from_numpy(w), stride=stride, padding=1))
    return x.mean(dim=(2, 3, 4)).numpy()


def handmade_features(videos: np.ndarray) -> np.ndarray:
    f = videos.astype(np.float64) / 255.0  # [N, T, H, W, 3]
    n = f.shape[0]
    hist = np.stack([np.stack([np.histogram(f[i, ..., c], bins=8, range=(0, 1))[0] for c in range(3)]).ravel() for i in range(n)])
    hist = hist / (f[0, ..., 0].size)
    gray = f.mean(axis=-1)
    gy = np.abs(np.diff(gray, axis=2))[:, :, :, :-1]
    gx = np.abs(np.diff(gray, axis=3))[:, :, :-1, :]
    grad = np.sqrt(gx**2 + gy**2)  # [N, T, H-1, W-1]
    per_frame = grad.mean(axis=(2, 3))
    edges = np.stack(
        [per_frame.mean(1), per_frame.std(1), np.percentile(grad.reshape(n, -1), 90, axis=1), (grad > 0.25).mean(axis=(1, 2, 3))],
        axis=1,
    )
    temporal = np.stack(
        [np.abs(f[:, lag:] - f[:, :-lag]).mean(axis=(1, 2, 3, 4)) for lag in (1, 2, 4)] + [gray.mean(axis=(2, 3)).std(axis=1)],
        axis=1,
    )
    return np.concatenate([hist, edges, temporal], axis=1)


def video_features(videos: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """``[N, 64]`` features of uint8 videos ``[N, T, H, W, 3]``."""
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be uint8 [N, T, H, W, 3], got {videos.dtype} {tuple(videos.shape)}")
    rows = [conv_features(videos[i : i + 128]) for i in range(0, len(videos), 128)]
    return np.concatenate([np.concatenate(rows), handmade_features(videos)], axis=1)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets, in reference-standardised units."""
    if generated.ndim != 2 or reference.ndim != 2 or generated.shape[1] != reference.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {generated.shape} and {reference.shape}")
    if len(generated) < 2 or len(reference) < 2:
        raise ValueError("each feature set needs at least two videos")
    scale = reference.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    g, r = generated / scale, reference / scale
    mu_g, mu_r = g.mean(0), r.mean(0)
    cov_g, cov_r = np.cov(g, rowvar=False), np.cov(r, rowvar=False)
    root_r = _sqrtm_psd(cov_r)
    cross = _sqrtm_psd(root_r @ cov_g @ root_r)
    return float(np.sum((mu_g - mu_r) ** 2) + np.trace(cov_g) + np.trace(cov_r) - 2.0 * np.trace(cross))


def reference_videos(prompts: list[str], per_prompt: int = 4, seed_base: int = REFERENCE_SEED_BASE) -> np.ndarray:
    """Real domain videos for each prompt from fixed seeds ``seed_base + k``: ``[len(prompts) * per_prompt, ...]``."""
    return np.stack([domain.generate_video(p, seed_base + k) for p in prompts for k in range(per_prompt)])


def pocket_fvd(videos: np.ndarray | list[np.ndarray], prompts: list[str], reference_per_prompt: int = 4) -> float:
    """Frechet distance of ``videos`` to real videos of the same (distinct) prompts from the fixed reference seeds."""
    reference = reference_videos(list(dict.fromkeys(prompts)), reference_per_prompt)
    return frechet_distance(video_features(videos), video_features(reference))
