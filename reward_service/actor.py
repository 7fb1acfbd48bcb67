"""The reward actor: builds its reward models from the registry once, then scores batches."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from reward_service.base import Video
from reward_service.registry import build_reward
from reward_service.result import RewardResult
from reward_service.scoring import combined_heads, score_isolated


@dataclass(frozen=True)
class RewardSpec:
    """A reward model to build in every actor: registry name and its config."""

    name: str
    config: dict = field(default_factory=dict)


class RewardActor:
    """Holds the reward models; one batch at a time."""

    def __init__(self, specs: list[RewardSpec], label: str) -> None:
        self.label = label
        self.models = [build_reward(spec.name, **spec.config) for spec in specs]
        self.heads = combined_heads(self.models)

    def ready(self) -> dict:
        return {"label": self.label, "pid": os.getpid(), "heads": list(self.heads)}

    def score(self, videos: list[Video], start: int, stop: int, prompts: list[str]) -> list[RewardResult]:
        # `videos` arrives resolved from its object-store reference (numpy frames are not copied).
        if not 0 <= start < stop <= len(videos) or stop - start != len(prompts):
            raise IndexError(f"batch [{start}:{stop}] with {len(prompts)} prompts does not fit {len(videos)} videos")
        return score_isolated(self.models, videos[start:stop], prompts, scored_by=self.label)
