"""The learner's door: every group is checked against the policy before any update uses it.

The codec guarantees a record is well-formed and internally consistent; it cannot know the policy.
A group that decodes but that this learner cannot use (latents of another geometry, values that are
not finite, rewards that are not finite where marked valid, a prompt the policy's text encoder
refuses, a policy version no run could have reached, an exploration the objective cannot train on) would make
the update raise or turn the adapter into NaN, and, redelivered, stop every restarted learner
again. Such a group is quarantined instead: dead-lettered with its reason, removed from the queue
(or the reference buffer) so it never returns, and counted per reason (`groups_quarantined_total`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from learner.settings import LearnerSettings
from replay.record import CandidateGroup
from reward_service.multi_reward import group_advantages

# The reasons a group is quarantined for (a fixed set: they are a metric's label values).
REASONS = ("geometry", "nonfinite", "reward", "prompt", "policy_version", "objective")
MAX_REWARD_HEADS = 64  # for the ceiling only: a record's reward table is [heads, G] float64
# Errors a text encoder raises for a prompt it cannot encode (a CUDA error is not one of them).
PROMPT_ERRORS = (ValueError, KeyError, TypeError, IndexError, UnicodeError)


class GroupRejected(ValueError):
    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class PolicyGeometry:
    """What a group must match: the policy's latent geometry and sampler, and the run's objective."""

    latent_shape: tuple[int, int, int]  # (C, H, W)
    frames_per_chunk: int
    num_chunks: int
    num_steps: int
    num_train_timesteps: int
    max_group_size: int
    objective: str

    @classmethod
    def of(cls, policy, config: LearnerSettings) -> PolicyGeometry:
        return cls(tuple(int(s) for s in policy.latent_shape), int(policy.frames_per_chunk), int(policy.num_chunks),
                   int(policy.num_steps), int(policy.sampler.num_train_timesteps), int(config.algorithm.group_size),
                   config.algorithm.objective)

    def max_record_bytes(self) -> int:
        """The tensors of the largest group this learner can use, all in float64: the store's ceiling
        (`StoreOptions.max_record_bytes`) for the records it reads."""
        frame = int(np.prod(self.latent_shape))
        G, T, f, L = self.max_group_size, self.num_steps, self.frames_per_chunk, self.num_chunks
        frames = 2 * G * T * f + (L - 1) * f + G * L * f  # pivot inputs and x0, prefix, final latents
        return 8 * (frames * frame + T + MAX_REWARD_HEADS * G) + G  # + timesteps, rewards, reward_valid


def check_group(group: CandidateGroup, geometry: PolicyGeometry, config: LearnerSettings, version: int,
                encode_prompt: Callable[[str], object]) -> None:
    """Raise `GroupRejected` naming the first problem that makes `group` unusable by this learner."""
    g = geometry
    G = group.group_size
    expected = (G, g.num_steps, g.frames_per_chunk, *g.latent_shape)
    if tuple(group.pivot_inputs.shape) != expected or group.num_chunks != g.num_chunks:
        raise GroupRejected(
            "geometry",
            f"pivot_inputs {list(group.pivot_inputs.shape)} with {group.num_chunks} chunks; the policy needs "
            f"[G, T={g.num_steps}, f={g.frames_per_chunk}, C, H, W = {list(g.latent_shape)}] "
            f"with {g.num_chunks} chunks",
        )
    if not 2 <= G <= g.max_group_size:
        raise GroupRejected("geometry", f"group_size {G} is outside 2..{g.max_group_size} (algorithm.group_size)")
    if g.objective == "nft" and group.final_latents is None:
        raise GroupRejected("objective", "NFT trains on final_latents and the group has none")
    if g.objective == "sde_grpo" and group.exploration != "renoise":
        raise GroupRejected("objective", f"SDE-GRPO needs re-noise forks; the group forks {group.exploration!r}")
    for name, tensor in group.tensors().items():
        bad = _count_nonfinite(tensor) if tensor.is_floating_point() else 0
        if bad:
            raise GroupRejected("nonfinite", f"{name} holds {bad} NaN or infinite values")
    if not bool(((group.timesteps >= 0) & (group.timesteps <= g.num_train_timesteps)).all()):
        raise GroupRejected("geometry", f"timesteps {group.timesteps.tolist()} outside 0..{g.num_train_timesteps}")
    _check_rewards(group, config)
    # A learner restored from its checkpoint can meet groups of the versions it lost (at most one
    # checkpoint interval and the iteration in flight ahead); anything further ahead is corrupt.
    ahead = config.run.checkpoint_every + 1
    if not 0 <= group.policy_version <= version + ahead:
        raise GroupRejected("policy_version", f"policy version {group.policy_version} is more than {ahead} versions "
                            f"(run.checkpoint_every + 1) ahead of the learner's {version}")
    try:
        encode_prompt(group.prompt)
    except PROMPT_ERRORS as err:
        raise GroupRejected("prompt", f"the policy's text encoder refuses the prompt: {err}") from None


def _count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN and inf propagate through a sum, so a finite sum means finite values: one fast pass (a
    tenth of `isfinite` on bf16 latents), and the exact count only when the sum is not finite."""
    if bool(torch.isfinite(tensor.sum())):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def _check_rewards(group: CandidateGroup, config: LearnerSettings) -> None:
    weights, valid = config.reward.weights, group.reward_valid.numpy()
    missing = sorted(set(weights) - set(group.rewards))
    if missing:
        raise GroupRejected("reward", f"no scores for the weighted heads {missing} (has {sorted(group.rewards)})")
    for head, scores in group.rewards.items():
        bad = int((~np.isfinite(scores.numpy()[valid])).sum())
        if bad:
            raise GroupRejected("reward", f"rewards[{head!r}] has {bad} NaN or infinite values marked valid")
    try:  # the learner's own computation: finite scores can still overflow the weighted sum
        adv = group_advantages({h: group.rewards[h].numpy() for h in weights}, weights, valid, config.reward.advantage)
    except (ValueError, KeyError) as err:
        raise GroupRejected("reward", f"advantages cannot be computed: {err}") from None
    if not np.isfinite(adv).all():
        raise GroupRejected("reward", "advantages are not finite (the rewards overflow the weighted sum)")
