"""What the learner actor answers the controller: small typed records, no tensors.

Data crosses actors as typed records (`RolloutTask`, `GroupSummary`, `CandidateGroup`); these are the
control plane's: an update's statistics, the learner's position, what a restore brought back. Each
field is part of the contract, so an objective without a ratio (NFT) leaves the ratio's statistics
out (None) instead of filling them with placeholders.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainStats(BaseModel):
    """One iteration's optimiser steps over a batch of groups, as the objective reports them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: int = Field(ge=0)  # groups trained on (those without a signal included)
    groups_without_signal: int = Field(ge=0)  # all advantages zero: no gradient
    loss: float  # NaN when no step was taken
    grad_norm: float
    group_reward_means: dict[str, float]  # per reward head, over the groups' valid branches
    # The clipped-ratio objectives' (copo, sde_grpo); None for an objective without a ratio (nft).
    clip_fraction: float | None = None
    ratio_max_deviation: float | None = None
    # An objective's own statistics, each a metrics column under its own name (e.g. `nft_ema_decay`).
    objective_stats: dict[str, float | bool] = Field(default_factory=dict)


class UpdateStats(TrainStats):
    """`TrainStats` plus the iteration's bookkeeping: what `Learner.train_on_policy` / `train_from_buffer`
    return to the driver."""

    policy_version: int = Field(ge=0)  # the adapter version after this update
    update_s: float = Field(ge=0.0)  # wall time of the whole call (pulling the groups included)
    quarantined: dict[str, int] = Field(default_factory=dict)  # groups refused at the door, by reason
    nonfinite_steps: int = Field(0, ge=0)  # optimiser steps skipped for a non-finite loss or gradient

    @property
    def groups_quarantined(self) -> int:
        return sum(self.quarantined.values())


class LearnerStatus(BaseModel):
    """Where the learner is: what a restarted learner restored shows here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iteration: int = Field(ge=0)
    version: int = Field(ge=0)
    unacked: int = Field(0, ge=0)  # applied deliveries waiting for the next checkpoint


class Published(BaseModel):
    """The adapter a `publish` put in the object store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=0)
    nbytes: int = Field(ge=0)


class DriverState(BaseModel):
    """The driver's part of a checkpoint (`save_checkpoint`'s `driver`): metrics rows written, and the
    prefix of the run's group ids."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics_rows: int = Field(ge=0)
    run_tag: str


class RestoreResult(BaseModel):
    """What `Learner.restore_latest` loaded: the checkpoint, its position, and the driver's part."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    iteration: int = Field(ge=0)
    policy_version: int = Field(ge=0)
    driver: DriverState | None = None  # None: written without one (e.g. by a learner used alone)
