"""The pivot chunk of a group replayed under the current policy, shared by AR-CoPO and SDE-GRPO.

Both objectives score the current policy's x0 predictions on a group's stored pivot inputs. The
replay of a group is B samples (anchors, or SDE-GRPO's branches) x T denoising steps, and every
(sample, step) pair enters the group's loss as an independent term once the quantities shared by the
whole group are fixed: AR-CoPO's loss is the mean over steps and anchors of a per-anchor term whose
temperature ("auto": the median distance of the step's old predictions over all anchors) depends on
the stored predictions only; SDE-GRPO's is the mean of per-transition clipped surrogates. So with
`algorithm.micro_batch_size` the pairs are replayed that many at a time, each micro-batch's share of
the loss is back-propagated at once (its graph freed before the next forward), and the accumulated
gradient is the full batch's. `micro_batch_size=None` is the single batched forward (`replay_steps`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from learner.objectives.base import WHOLE_BATCH, GroupShard, GroupWithAdvantages, GuardedStep, StepStats, mean
from policy.pipeline import StreamingVideoPolicy
from policy.pivot_replay import rebuild_prefix_cache, replay_pivot_chunk
from policy.recache import encode_schedule
from replay.record import CandidateGroup


@dataclass
class GroupLoss:
    loss: torch.Tensor  # scalar: with grad from `*_group_loss`, detached from `*_group_backward` (backward done)
    clip_fraction: float
    ratio_deviation: float  # max |rho - 1| (how far the update moved the surrogate policy)


def replay_steps(policy: StreamingVideoPolicy, group: CandidateGroup, branches: torch.Tensor, steps: range) -> torch.Tensor:
    """x0 predictions of the current policy on the stored inputs of `branches` x `steps`: [B, len(steps), f, C, H, W]."""
    text = encode_schedule(policy, group.prompt_schedule)  # one prompt, or LongLive's switches
    cache = rebuild_prefix_cache(policy, text, group.prefix_latents)
    step_index = torch.tensor(list(steps))
    x_t = group.pivot_inputs[branches][:, step_index]  # [B, S, f, C, H, W]
    t = group.timesteps[step_index][None].expand(len(branches), -1)
    x0 = replay_pivot_chunk(policy, text, group.prefix_latents, x_t.flatten(0, 1), t.flatten(), prefix_cache=cache)
    return x0.unflatten(0, (len(branches), len(steps)))


def pair_batches(num_samples: int, num_steps: int, size: int) -> list[list[tuple[int, int]]]:
    """(sample, step) pairs, sample-major (the order of the single forward), cut into runs of `size`."""
    if size < 1:
        raise ValueError(f"algorithm.micro_batch_size must be at least 1, got {size}")
    pairs = [(i, k) for i in range(num_samples) for k in range(num_steps)]
    return [pairs[start : start + size] for start in range(0, len(pairs), size)]


class GroupReplay:
    """The group's text conditioning and prefix KV cache, rebuilt once for all its micro-batches."""

    def __init__(self, policy: StreamingVideoPolicy, group: CandidateGroup) -> None:
        self.policy, self.group = policy, group
        self.text = policy.text_conditioning([group.prompt])
        self.cache = rebuild_prefix_cache(policy, self.text, group.prefix_latents)

    def x0(self, branches: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Current x0 predictions (float32, with grad) on the stored inputs of the pairs (branches[j], steps[j])."""
        g = self.group
        x_t = g.pivot_inputs[branches, steps]
        return replay_pivot_chunk(self.policy, self.text, g.prefix_latents, x_t, g.timesteps[steps], prefix_cache=self.cache).float()


def train_on_groups(
    groups: list[GroupWithAdvantages],
    optimizer: torch.optim.Optimizer,
    updates: int,
    group_backward: Callable[[CandidateGroup, torch.Tensor, float], GroupLoss],
    guarded_step: GuardedStep,
    shard: GroupShard = WHOLE_BATCH,
    skip_group: Callable[[CandidateGroup], None] = lambda group: None,
) -> StepStats:
    """`updates` optimiser steps, each on the mean of the groups' losses (`group_backward(group,
    advantages, loss_scale)` back-propagates `loss_scale` x a group's loss and returns it).

    In a learner group this rank back-propagates only `shard`'s groups, at the same 1 / len(groups) scale,
    and `skip_group` keeps the per-group random draws of the others; the loss handed to `guarded_step`
    (and reported) is this rank's share of the mean, which the ranks' shares add up to."""
    losses, clip_fracs, deviations, grad_norms = [], [], [], []
    for _ in range(updates if groups else 0):
        optimizer.zero_grad(set_to_none=True)
        step_losses = []
        for index, (group, adv) in enumerate(groups):
            if not shard.owns(index):
                skip_group(group)
                continue
            out = group_backward(group, adv, 1 / len(groups))
            step_losses.append(float(out.loss))
            clip_fracs.append(out.clip_fraction)
            deviations.append(out.ratio_deviation)
        losses.append(sum(step_losses) / len(groups))
        owned = [g.group_id for i, (g, _) in enumerate(groups) if shard.owns(i)]
        grad_norms.append(guarded_step(losses[-1], owned)[1])
    return StepStats(loss=mean(losses), grad_norm=mean(grad_norms), clip_fraction=mean(clip_fracs),
                     ratio_max_deviation=max(deviations, default=0.0))
