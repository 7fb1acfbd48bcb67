"""The losses of one candidate group under the current policy, one function per objective.

Each replays the stored pivot chunk through the current policy (the prefix KV cache rebuilt from the
stored clean prefix, without gradient) and hands tensors to the pure objectives in
`learner.objectives`, `learner.sde_grpo` and `learner.nft`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.objectives import copo_loss_with_stats
from learner.sde_grpo import sde_grpo_loss_with_stats, sde_step_log_prob
from policy.pipeline import StreamingVideoPolicy
from policy.pivot_replay import rebuild_prefix_cache, replay_pivot_chunk
from replay.record import CandidateGroup


@dataclass
class GroupLoss:
    loss: torch.Tensor  # scalar with grad
    clip_fraction: float
    ratio_deviation: float  # max |rho - 1| (how far the update moved the surrogate policy)


def _replay_steps(policy: StreamingVideoPolicy, group: CandidateGroup, branches: torch.Tensor, steps: range) -> torch.Tensor:
    """x0 predictions of the current policy on the stored inputs of `branches` x `steps`: [B, len(steps), f, C, H, W]."""
    text = policy.text_conditioning([group.prompt])
    cache = rebuild_prefix_cache(policy, text, group.prefix_latents)
    step_index = torch.tensor(list(steps))
    x_t = group.pivot_inputs[branches][:, step_index]  # [B, S, f, C, H, W]
    t = group.timesteps[step_index][None].expand(len(branches), -1)
    x0 = replay_pivot_chunk(policy, text, group.prefix_latents, x_t.flatten(0, 1), t.flatten(), prefix_cache=cache)
    return x0.unflatten(0, (len(branches), len(steps)))


def copo_group_loss(
    policy: StreamingVideoPolicy,
    group: CandidateGroup,
    advantages: torch.Tensor,
    anchors: torch.Tensor,
    tau: float | str,
    clip_eps: float | None,
) -> GroupLoss:
    """AR-CoPO on one group: the anchors' replayed x0 against every candidate's old x0, averaged over
    the pivot chunk's T denoising steps (all B x T replays in one batched forward)."""
    T = group.num_steps
    x0_theta = _replay_steps(policy, group, anchors, range(T)).float()  # [B, T, ...]
    x0_old = group.pivot_x0.to(x0_theta.device).float()  # [G, T, ...]
    adv = advantages.to(x0_theta.device)[None].expand(len(anchors), -1)
    anchors = anchors.to(x0_theta.device)
    losses, clip_fracs, deviations = [], [], []
    for k in range(T):
        old_k = x0_old[:, k][None].expand(len(anchors), *x0_old[:, k].shape)
        stats = copo_loss_with_stats(x0_theta[:, k], old_k, anchors, adv, tau, clip_eps)
        losses.append(stats.loss)
        clip_fracs.append(float(stats.clip_fraction))
        deviations.append(float(stats.rho_max_deviation))
    return GroupLoss(torch.stack(losses).mean(), sum(clip_fracs) / T, max(deviations))


def sde_grpo_group_loss(
    policy: StreamingVideoPolicy,
    group: CandidateGroup,
    advantages: torch.Tensor,
    branches: torch.Tensor,
    clip_eps: float | None,
    eta: float,
) -> GroupLoss:
    """SDE-GRPO on one group whose branches differ in the pivot chunk's re-noise draws: the Gaussian
    log-probability of each stored transition x_k -> x_{k+1} under the current and the old x0."""
    T = group.num_steps
    if T < 2:
        raise ValueError("SDE-GRPO needs at least two denoising steps (one stochastic transition)")
    x0_theta = _replay_steps(policy, group, branches, range(T - 1)).float()  # [B, T-1, ...]
    device = x0_theta.device
    inputs = group.pivot_inputs[branches].to(device).float()  # [B, T, ...]
    x0_old = group.pivot_x0[branches].to(device).float()
    sigmas = policy.sampler.sigmas(group.timesteps.to(device)).float()
    adv = advantages.to(device)[branches.to(device)]
    losses, clip_fracs, deviations = [], [], []
    for k in range(T - 1):
        args = (inputs[:, k + 1], inputs[:, k])
        logp = sde_step_log_prob(*args, x0_theta[:, k], sigmas[k], sigmas[k + 1], eta)
        logp_old = sde_step_log_prob(*args, x0_old[:, k], sigmas[k], sigmas[k + 1], eta)
        stats = sde_grpo_loss_with_stats(logp, logp_old, adv, clip_eps if clip_eps is not None else float("inf"))
        losses.append(stats.loss)
        clip_fracs.append(float(stats.clip_fraction))
        deviations.append(float((stats.ratio_mean - 1).abs()))
    return GroupLoss(torch.stack(losses).mean(), sum(clip_fracs) / (T - 1), max(deviations))
