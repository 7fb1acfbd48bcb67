"""Registers `pocket`: the pocket domain's verifier rewards (VQ, MQ, TA in [0, 1]; see docs/pocket.md)."""

from __future__ import annotations

import numpy as np

from reward_service.base import RewardModel, Video
from reward_service.registry import register_reward


class PocketVerifierReward(RewardModel):
    """Deterministic verifiers of `pocket.verifiers`, computed on CPU from decoded frames.

    A video the verifiers cannot score (a prompt outside the pocket grammar, frames of the wrong
    shape) is NaN in every head, so the pool marks it invalid with the reason logged here.
    """

    name = "pocket"

    def __init__(self) -> None:
        from pocket import verifiers

        self._verifiers = verifiers
        self.heads = verifiers.HEADS
        self.last_errors: dict[int, str] = {}

    def score(self, videos: list[Video], prompts: list[str]) -> dict[str, np.ndarray]:
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        out = {head: np.full(len(videos), np.nan, dtype=np.float64) for head in self.heads}
        self.last_errors = {}
        for i, (video, prompt) in enumerate(zip(videos, prompts)):
            try:
                scores = self._verifiers.score_video(video.frames, prompt)
            except ValueError as exc:
                self.last_errors[i] = str(exc)
                continue
            for head in self.heads:
                out[head][i] = scores[head]
        return out


@register_reward("pocket", heads=("VQ", "MQ", "TA"))
def build_pocket(**config) -> RewardModel:
    """No configuration: the verifiers have no parameters."""
    if config:
        raise ValueError(f"the pocket reward takes no configuration, got {sorted(config)}")
    return PocketVerifierReward()
