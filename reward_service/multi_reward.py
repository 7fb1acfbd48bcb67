"""Several reward heads into the one scalar advantage the algorithm uses.

Two ways, both over one group of G candidates (or N groups at once, shape [N, G]):

  "weighted_sum":  r_i = sum_h w_h s_{h,i}                      (combine)
                   A_i = (r_i - mean_j r_j) / (std_j r_j + eps)

  "per_head":      z_{h,i} = (s_{h,i} - mean_j s_{h,j}) / (std_j s_{h,j} + eps)
                   A_i = sum_h w_h z_{h,i}
                   (each head normalised within the group first, so a head with a large spread
                   cannot drown the others; this is how DanceGRPO combines VQ and MQ)

Means and stds run over the group's valid samples only; std is the population std (divide by the
number of valid samples), as DanceGRPO and Flow-GRPO compute it. Invalid samples get
advantage 0 and take no part in any statistic. A head (or combined reward) with fewer than two
valid samples or no spread carries no preference and contributes 0. Dropping a group with too few
valid samples (and counting it) is the caller's decision: `count_valid` helps.
Per-head scores are inputs here and are never overwritten; records keep them as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MODES = ("weighted_sum", "per_head")


def combine(scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """r = sum_h w_h * s_h over the heads named in `weights` (a head not weighted is left out)."""
    if not weights:
        raise ValueError("weights must name at least one head")
    missing = [h for h in weights if h not in scores]
    if missing:
        raise KeyError(f"weights name heads {missing} that are not in the scores {sorted(scores)}")
    arrays = {h: np.asarray(scores[h], dtype=np.float64) for h in weights}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"heads have different shapes: { {h: a.shape for h, a in arrays.items()} }")
    total = np.zeros(shapes.pop(), dtype=np.float64)
    for head, w in weights.items():
        total = total + float(w) * arrays[head]
    return total


def normalise_in_group(values: np.ndarray, valid: np.ndarray | None = None, eps: float = 1e-8) -> np.ndarray:
    """z_i = (x_i - mean_valid x) / (std_valid x + eps) along the last axis; 0 where invalid or
    where the group has < 2 valid samples or no spread."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"values must be [G] or [N, G], got shape {x.shape}")
    mask = np.ones(x.shape, dtype=bool) if valid is None else np.asarray(valid)
    if mask.dtype != bool or mask.shape != x.shape:
        raise ValueError(f"valid must be a bool array of shape {x.shape}, got {mask.dtype} {mask.shape}")
    if not np.isfinite(x[mask]).all():
        raise ValueError("values marked valid contain NaN or inf; mark those samples invalid")
    count = mask.sum(axis=-1, keepdims=True)
    safe = np.maximum(count, 1)
    filled = np.where(mask, x, 0.0)
    mean = filled.sum(axis=-1, keepdims=True) / safe
    centred = np.where(mask, x - mean, 0.0)
    std = np.sqrt((centred**2).sum(axis=-1, keepdims=True) / safe)
    spread = np.where(mask, x, -np.inf).max(axis=-1, keepdims=True) > np.where(mask, x, np.inf).min(
        axis=-1, keepdims=True
    )
    informative = (count >= 2) & spread
    return np.where(mask & informative, centred / (std + eps), 0.0)


def group_advantages(
    scores: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    valid: np.ndarray | None = None,
    mode: str = "weighted_sum",
    eps: float = 1e-8,
) -> np.ndarray:
    """Advantages [G] (or [N, G]) from per-head scores {head: [G] or [N, G]}; see module docstring."""
    missing = [h for h in weights if h not in scores]
    if missing:
        raise KeyError(f"weights name heads {missing} that are not in the scores {sorted(scores)}")
    if mode == "weighted_sum":
        return normalise_in_group(combine(scores, weights), valid, eps)
    if mode == "per_head":
        per_head = {h: normalise_in_group(scores[h], valid, eps) for h in weights}
        return combine(per_head, weights)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def count_valid(valid: np.ndarray) -> np.ndarray:
    """Valid samples per group (last axis)."""
    return np.asarray(valid, dtype=bool).sum(axis=-1)


def results_to_arrays(results, heads: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """RewardResults of one group -> ({head: float64 [G]}, valid bool [G]); NaN kept where invalid."""
    scores = {h: np.array([r.scores[h] for r in results], dtype=np.float64) for h in heads}
    valid = np.array([r.valid for r in results], dtype=bool)
    return scores, valid
