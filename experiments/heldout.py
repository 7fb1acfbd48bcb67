"""Held-out evaluation of base, trained and merged weights, side by side, in this process.

Every candidate sees the same (prompt, noise seed) pairs: the held-out pocket prompts (unseen colour,
shape and direction combinations), one video each, seeds from `controller.task_sampler.eval_set` with
run seed 0, whatever seed a model was trained with. Scores: every verifier head, Overall (their sum,
as VideoAlign's), and FVD-p (`pocket.ood_metric.pocket_fvd`; the real reference videos'
features are computed once here and reused for every candidate).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from experiments.tables import HEADS, Scores
from controller.evaluation import evaluate_policy
from policy.factory import build_configured_policy
from controller.task_sampler import eval_set, load_prompts
from policy.lora import load_adapter, merge_adapters
from pocket.ood_metric import frechet_distance, reference_videos, video_features
from reward_service.registry import build_reward

REFERENCE_PER_PROMPT = 4  # as pocket_fvd


class HeldOut:
    def __init__(self, config, prompts_limit: int | None):
        """`config`: a run config; its policy settings give the base weights, its reward model the heads."""
        self.policy = build_configured_policy(config.policy)
        self.base_transformer = self.policy.transformer
        self.rewards = [build_reward(config.reward.model, **config.reward.options)]
        self.prompts, self.seeds = eval_set(load_prompts(config.rollout.eval_prompts), 1, prompts_limit, 0)
        if len(self.prompts) < 2:
            raise ValueError("the held-out evaluation needs at least two prompts (FVD-p fits a covariance)")
        references = reference_videos(list(dict.fromkeys(self.prompts)), REFERENCE_PER_PROMPT)
        self.reference_features = video_features(references)
        self._base: Scores | None = None

    def evaluate(self, transformer) -> Scores:
        self.policy.transformer = transformer
        try:
            summary = evaluate_policy(self.policy, self.prompts, self.seeds, self.rewards, {h: 1.0 for h in HEADS})
        finally:
            self.policy.transformer = self.base_transformer
        fvd = frechet_distance(video_features(np.stack(summary.videos)), self.reference_features)
        heads = {h: summary.rewards[h] for h in HEADS}
        overall = float(sum(heads.values())) if all(math.isfinite(v) for v in heads.values()) else math.nan
        return Scores(heads, overall, fvd, summary.invalid)

    def base(self) -> Scores:
        if self._base is None:
            self._base = self.evaluate(self.base_transformer)
        return self._base

    def merged(self, adapters: dict[Path, float]) -> Scores:
        """The base weights plus `scale * delta` of each adapter directory (PEFT layout)."""
        holder = copy.deepcopy(self.base_transformer)
        names = {}
        for k, directory in enumerate(adapters):
            names[f"candidate_{k}"] = adapters[directory]
            load_adapter(holder, directory, f"candidate_{k}")
        return self.evaluate(merge_adapters(holder, names, inplace=True))

    def adapter(self, directory: Path) -> Scores:
        return self.merged({Path(directory): 1.0})
