"""The `algorithm` section of the run configuration, and what the learner actor receives.

The learner gets `LearnerSettings` (the controller's `Config.learner_settings()`), not the whole run
configuration: the policy and adapter it trains, the algorithm, the reward weights, its seed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, model_validator

from policy.settings import LoraSettings, PolicySettings
from policy.settings_types import Int, Real, Section
from reward_service.settings import RewardSettings


class AlgorithmSettings(Section):
    objective: Literal["copo", "sde_grpo", "nft"] = "copo"
    mode: Literal["on_policy", "semi_on_policy", "off_policy"] = "on_policy"
    group_size: Int = Field(12, ge=2)
    perturbation_sigma: Real = Field(0.5, ge=0.0, lt=1.0)
    anchors_per_group: Int = Field(4, ge=1)
    updates_per_iteration: Int = Field(2, ge=1)
    groups_per_iteration: Int = Field(8, ge=1)
    learning_rate: Real = Field(1e-5, gt=0)
    # (anchor, step) samples per pivot-replay forward with gradient (copo, sde_grpo): the group's samples
    # are replayed in micro-batches of this size and their gradients accumulated, which equals the
    # full batch's gradient; it bounds the learner's saved activations. None: all samples in one forward.
    micro_batch_size: Int | None = Field(None, ge=1)
    weight_decay: Real = Field(0.0, ge=0)
    max_grad_norm: Real = Field(1.0, gt=0)
    clip_eps: Real | None = Field(1e-4, gt=0)
    # Temperature of the distance softmax; "auto" uses the median off-anchor distance of each group.
    tau: Real | Literal["auto"] = "auto"
    # Pipelining with bounded staleness: 0 = strictly sequential (rollout, update, broadcast); >= 1: the
    # fleet makes the next iteration's groups during the update, and the learner drops (the driver
    # counts, `groups_stale`) groups made by a policy more than this many versions behind its own.
    max_policy_lag: Int = Field(0, ge=0)
    # Relative weight of each chunk as the pivot (one per chunk of the preset); None: uniform, the
    # paper's p ~ U(1..L). docs/pocket.md measures the reward spread a fork carries at each chunk.
    pivot_weights: list[Real] | None = None
    adapter_name: str | None = None  # default: the mode's name
    # SDE-GRPO: stochasticity of the intermediate steps (1.0 = the sampler's own re-noise).
    sde_eta: Real = Field(1.0, gt=0, le=1.0)
    # Astrolabe NFT
    nft_beta: Real = Field(0.1, gt=0)
    nft_kl_beta: Real = Field(1e-4, ge=0)
    nft_window_chunks: Int | None = Field(None, ge=1)  # chunks trained from the pivot on; None: to the end
    # Branches per NFT micro-batch (bounds the learner's KV caches: 3 rolling contexts of this many videos).
    nft_micro_batch: Int | None = Field(None, ge=1)  # None: all valid branches of a group at once
    # Uncertainty-aware selective regularisation towards a dynamic reference adapter (replaces the base KL).
    nft_selective_reg: StrictBool = False
    nft_aux_heads: list[str] | None = None  # auxiliary rewards of the disagreement; None: every weighted head
    nft_ema_rate: Real = Field(0.001, ge=0)  # old adapter decay = min(rate * optimiser steps, max)
    nft_ema_max: Real = Field(0.5, ge=0, le=1.0)
    # Optimiser steps in a row whose loss or gradients are not finite (each one skipped) that stop the run.
    max_nonfinite_steps: Int = Field(3, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "AlgorithmSettings":
        if self.pivot_weights is not None and (
            not self.pivot_weights or any(w < 0 for w in self.pivot_weights) or not sum(self.pivot_weights) > 0
        ):
            raise ValueError(
                f"algorithm.pivot_weights must be non-negative with a positive sum (one per chunk), got {self.pivot_weights}"
            )
        if self.anchors_per_group > self.group_size:
            raise ValueError(
                f"algorithm.anchors_per_group ({self.anchors_per_group}) must not exceed "
                f"algorithm.group_size ({self.group_size})"
            )
        return self

    @property
    def effective_clip_eps(self) -> float | None:
        """Off-policy is semi-on-policy without the ratio clip (the paper's ablation)."""
        return None if self.mode == "off_policy" else self.clip_eps

    @property
    def effective_adapter_name(self) -> str:
        return self.adapter_name or self.mode


class LearnerRunSettings(Section):
    """The part of the `run` section the learner reads: rank 0 of a learner group starts the other ranks
    with the resources it was started with (`learner.learner_group`)."""

    seed: Int = 0
    checkpoint_every: Int = Field(10, ge=1)
    num_learners: Int = Field(1, ge=1)
    num_gpus: Real = Field(0.0, ge=0)  # per learner rank
    resources: dict[str, Real] = Field(default_factory=dict)  # per learner rank


class LearnerSettings(Section):
    policy: PolicySettings = Field(default_factory=PolicySettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    algorithm: AlgorithmSettings = Field(default_factory=AlgorithmSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    run: LearnerRunSettings = Field(default_factory=LearnerRunSettings)
