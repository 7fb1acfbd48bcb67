"""The `rollout` section of the run configuration, and what a rollout worker receives.

A worker gets `WorkerSettings` (the controller's `Config.worker_settings()`), not the whole run
configuration: the policy it builds, its adapter, its batch size, the reward floor of a group.
"""

from __future__ import annotations

from pydantic import Field

from policy.settings import LoraSettings, PolicySettings
from policy.settings_types import Int, Real, Section


class RolloutSettings(Section):
    num_workers: Int = Field(2, ge=1)
    num_gpus_per_worker: Real = Field(0.0, ge=0)
    num_cpus_per_worker: Real = Field(1.0, gt=0)
    # Custom node resources each worker asks for, to pin it to its node group (deploy/: {"rollout_gpu": 1}).
    resources: dict[str, Real] = Field(default_factory=dict)
    branch_batch_size: Int | None = Field(None, ge=1)
    # Videos decoded at once (None: a whole group): the VAE decode's memory grows with it.
    decode_batch_size: Int | None = Field(None, ge=1)
    # "pocket:train" / "pocket:heldout" name the pocket prompt sets; anything else is a text file, one prompt a line.
    prompts: str = "pocket:train"
    eval_prompts: str = "pocket:heldout"


class WorkerSettings(Section):
    policy: PolicySettings = Field(default_factory=PolicySettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    adapter_name: str  # the adapter a current-policy worker holds (algorithm.effective_adapter_name)
    min_valid_per_group: Int = Field(2, ge=2)  # reward.min_valid_per_group
