"""The `reward` section of the run configuration: the reward model, its heads' weights, its actors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from policy.settings_types import Int, Real, Section


class RewardSettings(Section):
    model: str = "pocket"
    options: dict[str, Any] = Field(default_factory=dict)  # passed to the reward model's factory
    weights: dict[str, Real] = Field(default_factory=lambda: {"VQ": 1.0, "MQ": 1.0, "TA": 1.0})
    advantage: Literal["weighted_sum", "per_head"] = "weighted_sum"
    num_actors: Int = Field(1, ge=1)
    num_gpus_per_actor: Real = Field(0.0, ge=0)
    resources: dict[str, Real] = Field(default_factory=dict)  # e.g. {"reward_gpu": 1}
    batch_size: Int = Field(8, ge=1)
    timeout_s: Real = Field(300.0, gt=0)
    min_valid_per_group: Int = Field(2, ge=2)

    @model_validator(mode="after")
    def _check_head_names(self) -> "RewardSettings":
        # metrics.jsonl writes a head as `reward_<head>`, beside `reward_mean` and the timing `reward_s`.
        clash = sorted(set(self.weights) & {"mean", "s"})
        if clash:
            raise ValueError(f"reward.weights: head name(s) {clash} clash with the metrics columns reward_mean / reward_s")
        return self
