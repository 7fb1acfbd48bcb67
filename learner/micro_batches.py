"""AR-CoPO and SDE-GRPO on one group in micro-batches of (sample, step) replays, gradients accumulated.

The pivot replay of a group is B samples (anchors, or SDE-GRPO's branches) x T denoising steps, and
every (sample, step) pair enters the group's loss as an independent term once the quantities shared
by the whole group are fixed: AR-CoPO's loss is the mean over steps and anchors of a per-anchor
term whose temperature ("auto": the median distance of the step's old predictions over all anchors)
depends on the stored predictions only; SDE-GRPO's is the mean of per-transition clipped surrogates.
So the pairs are replayed `micro_batch_size` at a time, each micro-batch's share of the loss is
back-propagated at once (its graph freed before the next forward), and the accumulated gradient is
the full batch's. `micro_batch_size=None` is the single forward of `copo_group_loss` /
`sde_grpo_group_loss`, backward included.
"""

from __future__ import annotations

import torch

from learner.objectives import auto_tau, copo_loss_with_stats
from learner.sde_grpo import sde_grpo_loss_with_stats, sde_step_log_prob
from learner.updates import GroupLoss, copo_group_loss, sde_grpo_group_loss
from policy.pipeline import StreamingVideoPolicy
from policy.pivot_replay import rebuild_prefix_cache, replay_pivot_chunk
from replay.record import CandidateGroup


def _pair_batches(num_samples: int, num_steps: int, size: int) -> list[list[tuple[int, int]]]:
    """(sample, step) pairs, sample-major (the order of the single forward), cut into runs of `size`."""
    if size < 1:
        raise ValueError(f"algorithm.micro_batch_size must be at least 1, got {size}")
    pairs = [(i, k) for i in range(num_samples) for k in range(num_steps)]
    return [pairs[start : start + size] for start in range(0, len(pairs), size)]


class _GroupReplay:
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


def copo_group_backward(
    policy: StreamingVideoPolicy,
    group: CandidateGroup,
    advantages: torch.Tensor,
    anchors: torch.Tensor,
    tau: float | str,
    clip_eps: float | None,
    micro_batch_size: int | None,
    loss_scale: float = 1.0,
) -> GroupLoss:
    """Back-propagate `loss_scale` x the AR-CoPO loss of `copo_group_loss`; returns it (detached) and its stats."""
    if micro_batch_size is None:
        out = copo_group_loss(policy, group, advantages, anchors, tau, clip_eps)
        (out.loss * loss_scale).backward()
        return GroupLoss(out.loss.detach(), out.clip_fraction, out.ratio_deviation)
    B, T = len(anchors), group.num_steps
    x0_old = group.pivot_x0.to(policy.device).float()  # [G, T, ...]
    anchors = anchors.to(policy.device)
    adv = advantages.to(policy.device)
    # The step's temperature over all B anchors, as the single forward resolves it.
    taus = [auto_tau(x0_old[:, k][None].expand(B, *x0_old[:, k].shape), anchors).double() if tau == "auto" else tau
            for k in range(T)]
    replay = _GroupReplay(policy, group)
    total, clip_fraction, deviation = 0.0, 0.0, 0.0
    for pairs in _pair_batches(B, T, micro_batch_size):
        rows = torch.tensor([i for i, _ in pairs])
        steps = torch.tensor([k for _, k in pairs])
        x0_theta = replay.x0(anchors[rows].cpu(), steps)
        loss = x0_theta.new_zeros(())
        for k in steps.unique().tolist():
            at = torch.nonzero(steps == k).flatten()
            n = len(at)
            stats = copo_loss_with_stats(x0_theta[at], x0_old[:, k][None].expand(n, *x0_old[:, k].shape),
                                         anchors[rows[at]], adv[None].expand(n, -1), taus[k], clip_eps)
            loss = loss + stats.loss * (n / (B * T))
            clip_fraction += float(stats.clip_fraction) * n / (B * T)
            deviation = max(deviation, float(stats.rho_max_deviation))
        (loss * loss_scale).backward()
        total += float(loss.detach())
    return GroupLoss(torch.tensor(total), clip_fraction, deviation)


def sde_grpo_group_backward(
    policy: StreamingVideoPolicy,
    group: CandidateGroup,
    advantages: torch.Tensor,
    branches: torch.Tensor,
    clip_eps: float | None,
    eta: float,
    micro_batch_size: int | None,
    loss_scale: float = 1.0,
) -> GroupLoss:
    """Back-propagate `loss_scale` x the SDE-GRPO loss of `sde_grpo_group_loss`; returns it (detached) and its stats."""
    if micro_batch_size is None:
        out = sde_grpo_group_loss(policy, group, advantages, branches, clip_eps, eta)
        (out.loss * loss_scale).backward()
        return GroupLoss(out.loss.detach(), out.clip_fraction, out.ratio_deviation)
    B, T = len(branches), group.num_steps
    if T < 2:
        raise ValueError("SDE-GRPO needs at least two denoising steps (one stochastic transition)")
    device = policy.device
    sigmas = policy.sampler.sigmas(group.timesteps.to(device)).float()
    clip = clip_eps if clip_eps is not None else float("inf")
    replay = _GroupReplay(policy, group)
    ratio_sums = torch.zeros(T - 1, dtype=torch.float64)  # per step, for the mean ratio of each step
    total, clip_fraction = 0.0, 0.0
    for pairs in _pair_batches(B, T - 1, micro_batch_size):
        rows = torch.tensor([i for i, _ in pairs])
        steps = torch.tensor([k for _, k in pairs])
        rows_branch = branches[rows].cpu()
        x0_theta = replay.x0(rows_branch, steps)
        inputs = group.pivot_inputs[rows_branch].to(device).float()  # [n, T, ...]
        pick = torch.arange(len(pairs))
        x_next, x_t = inputs[pick, steps + 1], inputs[pick, steps]
        x0_old = group.pivot_x0[rows_branch, steps].to(device).float()
        sigma, sigma_next = sigmas[steps.to(device)], sigmas[steps.to(device) + 1]
        logp = sde_step_log_prob(x_next, x_t, x0_theta, sigma, sigma_next, eta)
        logp_old = sde_step_log_prob(x_next, x_t, x0_old, sigma, sigma_next, eta)
        stats = sde_grpo_loss_with_stats(logp, logp_old, advantages.to(device)[rows_branch.to(device)], clip)
        loss = stats.loss * (len(pairs) / (B * (T - 1)))
        (loss * loss_scale).backward()
        total += float(loss.detach())
        clip_fraction += float(stats.clip_fraction) * len(pairs) / (B * (T - 1))
        ratio_sums.index_add_(0, steps, torch.exp(logp - logp_old).detach().double().cpu())
    deviation = float((ratio_sums / B - 1).abs().max())
    return GroupLoss(torch.tensor(total), clip_fraction, deviation)
