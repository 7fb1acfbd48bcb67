"""Held-out evaluation of a policy in one process: the in-domain rewards and the out-of-domain metric.

The training loop evaluates through its rollout workers (`System.evaluate`); merging and the
experiments evaluate candidate weights here, side by side, with the same prompts and seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from policy.generation import generate_videos
from policy.pipeline import StreamingVideoPolicy
from policy.plugins import get_ood_metric
from policy.presets import get_preset
from policy.video_compare import comparison_sheet
from reward_service.base import RewardModel, Video
from reward_service.multi_reward import combine
from reward_service.scoring import score_isolated

def ood_metric_for_preset(preset: str) -> str | None:
    """The out-of-domain metric a run of `preset` reports beside its rewards (None: none defined)."""
    return get_preset(preset).ood_metric


@dataclass
class EvalSummary:
    rewards: dict[str, float]  # mean per head over valid videos
    reward: float  # the weighted combination of the heads' means
    ood: float | None  # out-of-domain metric (lower is better), None when not configured
    invalid: int
    videos: list[np.ndarray] = field(default_factory=list, repr=False)

    def row(self) -> dict:
        out = {"reward": self.reward, **{f"reward_{h}": v for h, v in self.rewards.items()}, "invalid": self.invalid}
        if self.ood is not None:
            out["ood"] = self.ood
        return out


def ood_metric(name: str | None, videos: list[np.ndarray], prompts: list[str]) -> float | None:
    """``name``: an out-of-domain metric a plug-in registers (``policy.plugins``), or None for none."""
    if name is None:
        return None
    return get_ood_metric(name)(np.stack(videos), prompts)


def evaluate_policy(
    policy: StreamingVideoPolicy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    rewards: Sequence[RewardModel],
    weights: Mapping[str, float],
    ood: str | None = None,
    batch_size: int = 16,
) -> EvalSummary:
    """Generate one video per (prompt, seed), score it, and compute the out-of-domain metric."""
    latents = generate_videos(policy, list(prompts), list(seeds), batch_size=batch_size)
    frames = policy.decode(latents)
    videos = [np.ascontiguousarray(f) for f in frames]
    results = score_isolated(rewards, [Video(v, policy.fps) for v in videos], list(prompts))
    valid = [r for r in results if r.valid]
    means = {h: float(np.mean([r.scores[h] for r in valid])) if valid else math.nan for h in weights}
    combined = float(combine({h: [means[h]] for h in weights}, weights)[0])
    return EvalSummary(means, combined, ood_metric(ood, videos, list(prompts)), len(results) - len(valid), videos)


def write_base_vs_final(samples: dict, path: Path, heads: list[str]) -> Path | None:
    """The base policy's and the last evaluation's samples side by side (same prompts and seeds),
    each with its scores; None when the run has not both (a resumed run has no base)."""
    finals = sorted(t for t in samples if t.startswith("iter_"))
    if "base" not in samples or not finals:
        return None
    (before, before_res), (after, after_res) = samples["base"], samples[finals[-1]]
    labels = [f"{r.prompt} (seed {r.seed})" for r in before_res]
    return comparison_sheet(before, after, labels, [r.rewards for r in before_res], [r.rewards for r in after_res], path,
                            titles=("base", f"iteration {int(finals[-1][len('iter_'):])}"), heads=heads)
