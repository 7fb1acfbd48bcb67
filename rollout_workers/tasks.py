"""What the driver asks a rollout worker for, and what comes back (small, typed, no tensors)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policy.recache import check_prompt_schedule


class RolloutTask(BaseModel):
    """One candidate group to generate. Everything random about it follows from `noise_seed`, so a
    task re-run after a worker crash gives the same group (and the same `group_id`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group_id: str
    prompt: str
    noise_seed: int = Field(ge=0)
    pivot: int = Field(ge=0)  # 0-based chunk index
    group_size: int = Field(ge=2)
    sigma: float = Field(ge=0.0, le=1.0)
    exploration: Literal["initial_noise", "renoise"] = "initial_noise"
    adapter_name: str  # the adapter the group trains (reference rollouts name the adapter they feed)
    destination: Literal["queue", "buffer"] = "queue"
    record_final_latents: bool = False
    # Prompts per chunk, [(first chunk, prompt), ...] from chunk 0 (LongLive's interactive switches, with
    # its KV re-cache); None: `prompt` throughout. `prompt` is what the rewards score either way.
    prompt_schedule: tuple[tuple[int, str], ...] | None = None

    @field_validator("prompt_schedule")
    @classmethod
    def _schedule(cls, schedule: tuple[tuple[int, str], ...] | None) -> tuple[tuple[int, str], ...] | None:
        return None if schedule is None else tuple(check_prompt_schedule(schedule))


class GroupSummary(BaseModel):
    """What the driver learns about a finished group (the group itself went to the replay store)."""

    model_config = ConfigDict(extra="forbid")

    group_id: str
    worker: str
    prompt: str
    pivot: int
    policy_version: int
    # False: dropped (too few valid rewards), a duplicate of an applied group, or (marked by the
    # controller) staler than algorithm.max_policy_lag, which the learner's pull drops
    stored: bool
    drop_reason: str = ""
    reward_means: dict[str, float]  # per head, over valid branches
    num_valid: int
    forward_passes: int
    rollout_s: float
    decode_s: float
    reward_s: float
    push_s: float
    started_at: float = 0.0  # wall-clock (time.time()) when the worker began the group, and when it was stored
    finished_at: float = 0.0


class EvalResult(BaseModel):
    """Held-out scores of one (prompt, seed) video under the worker's current adapter."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    seed: int
    policy_version: int
    rewards: dict[str, float]
    valid: bool
    reason: str = ""


class WorkerInfo(BaseModel):
    """What a rollout worker says about itself when the fleet probes it (`RolloutWorker.info`)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    pid: int
    adapter: str | None  # None: a reference worker, which takes no adapter
    version: int = Field(ge=0)  # the adapter version it holds
    node_id: str | None = None
    groups_produced: int | None = None  # simulated workers count what they made
