"""SDE-GRPO (DanceGRPO / Flow-GRPO style) on the 4-step consistency sampler, as pure functions.

The sampler's step from x_t (noise level sigma) to the next input (noise level sigma'), with
stochasticity eta in (0, 1]:

    x0      = x_t - sigma * v                                    (the model's prediction)
    eps_hat = (x_t - (1 - sigma) * x0) / sigma                   (the noise x_t implies)
    x'      = (1 - sigma') x0 + sigma' (sqrt(1 - eta^2) eps_hat + eta eps'),   eps' ~ N(0, I)

so x' | x_t is Gaussian with mean mu = (1 - sigma') x0 + sigma' sqrt(1 - eta^2) eps_hat and standard
deviation sigma' * eta. eta = 1 is the plain consistency sampler (fresh re-noise, mu = (1 - sigma') x0).
The policy's log-probability of a step is that Gaussian's log-density, and the loss is PPO's
clipped surrogate on the ratio of new to old log-probabilities.

The log-probability and loss are pure functions of tensors. Below them, the learner's side: one
group's loss on its replayed pivot transitions (`sde_grpo_group_loss`, `sde_grpo_group_backward` in
micro-batches) and the `SdeGrpoObjective` that trains on a batch of groups.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from learner.settings import AlgorithmSettings
from learner.objectives.base import WHOLE_BATCH, GroupShard, GroupWithAdvantages, GuardedStep, StepStats
from learner.objectives.group_replay import GroupLoss, GroupReplay, pair_batches, replay_steps, train_on_groups
from policy.pipeline import StreamingVideoPolicy
from replay.record import CandidateGroup

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


class SdeGrpoLossStats(NamedTuple):
    loss: torch.Tensor  # scalar, with grad
    clip_fraction: torch.Tensor  # share of samples with |ratio - 1| > clip_eps
    approx_kl: torch.Tensor  # 0.5 * mean((logp - logp_old)^2), as Flow-GRPO logs it
    ratio_mean: torch.Tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float or a [B] tensor, shaped [B, 1, 1, ...] to broadcast against `like`."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0:
        return value
    if value.shape != like.shape[:1]:
        raise ValueError(f"{name} must be a float or a [B]={like.shape[0]} tensor, got {tuple(value.shape)}")
    return value.view(-1, *([1] * (like.dim() - 1)))


def sde_step_mean_std(
    x_t: torch.Tensor,
    x0_pred: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the sampler's Gaussian step x_t -> x'."""
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must lie in (0, 1], got {eta}")
    sigma = _per_sample(sigma, x_t, "sigma")
    sigma_next = _per_sample(sigma_next, x_t, "sigma_next")
    if bool((sigma <= 0).any()) or bool((sigma > 1).any()):
        raise ValueError("sigma must lie in (0, 1]: the step starts from a noisy input")
    if bool((sigma_next <= 0).any()) or bool((sigma_next >= 1).any()):
        raise ValueError(
            "sigma_next must lie in (0, 1): the final step (sigma_next = 0) is deterministic and has no "
            "log-probability"
        )
    eps_hat = (x_t - (1.0 - sigma) * x0_pred) / sigma
    mean = (1.0 - sigma_next) * x0_pred + sigma_next * math.sqrt(1.0 - eta * eta) * eps_hat
    return mean, sigma_next * eta


def sde_step_log_prob(
    x_next: torch.Tensor,
    x_t: torch.Tensor,
    x0_pred: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """log N(x_next; mu, std^2) per element, averaged over all elements of each sample: [B].

    Includes the constant terms (-log std - log sqrt(2 pi)), so the value is a true mean log-density;
    they cancel in the ratio new/old, which is all the loss uses. Averaging rather than summing (as
    DanceGRPO does) keeps the log-ratio on the scale of one element, so a clip of 1e-4 means the same
    thing at every latent size. Gradients flow through `x0_pred`.
    """
    if not (x_next.shape == x_t.shape == x0_pred.shape):
        raise ValueError(
            f"x_next, x_t and x0_pred must share one shape, got {tuple(x_next.shape)}, "
            f"{tuple(x_t.shape)}, {tuple(x0_pred.shape)}"
        )
    mean, std = sde_step_mean_std(x_t, x0_pred, sigma, sigma_next, eta)
    log_density = -((x_next - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _HALF_LOG_TWO_PI
    return log_density.mean(dim=tuple(range(1, log_density.dim())))


def sde_grpo_loss_with_stats(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    adv_clip: float = 5.0,
) -> SdeGrpoLossStats:
    """`sde_grpo_loss` plus diagnostics."""
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            f"log_prob, old_log_prob and advantages must share one shape, got {tuple(log_prob.shape)}, "
            f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    if not clip_eps > 0 or not adv_clip > 0:
        raise ValueError(f"clip_eps and adv_clip must be positive, got {clip_eps}, {adv_clip}")
    adv = torch.clamp(advantages.detach(), -adv_clip, adv_clip)
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped).mean()
    ratio_d, log_ratio_d = ratio.detach(), log_ratio.detach()
    return SdeGrpoLossStats(
        loss=loss,
        clip_fraction=((ratio_d - 1.0).abs() > clip_eps).to(loss.dtype).mean(),
        approx_kl=0.5 * log_ratio_d.square().mean(),
        ratio_mean=ratio_d.mean(),
    )


def sde_grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    adv_clip: float = 5.0,
) -> torch.Tensor:
    """PPO-clipped surrogate: mean(max(-A ratio, -A clip(ratio, 1-c, 1+c))), ratio = exp(logp - logp_old),
    A clamped to [-adv_clip, adv_clip]. All inputs have one shape (e.g. [B] for one step)."""
    return sde_grpo_loss_with_stats(log_prob, old_log_prob, advantages, clip_eps, adv_clip).loss


# ---------------------------------------------------------------- the learner's side
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
    x0_theta = replay_steps(policy, group, branches, range(T - 1)).float()  # [B, T-1, ...]
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
    """Back-propagate `loss_scale` x the SDE-GRPO loss of `sde_grpo_group_loss`, in micro-batches of
    (branch, transition) replays (`learner.objectives.group_replay`); returns it (detached) and its stats."""
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
    replay = GroupReplay(policy, group)
    ratio_sums = torch.zeros(T - 1, dtype=torch.float64)  # per step, for the mean ratio of each step
    total, clip_fraction = 0.0, 0.0
    for pairs in pair_batches(B, T - 1, micro_batch_size):
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


class SdeGrpoObjective:
    """SDE-GRPO in the learner: every valid branch of every group (re-noise forks only: checked at the
    door, `learner.group_validation`), the groups' mean loss per optimiser step."""

    name = "sde_grpo"
    checkpoint_adapters: dict[str, str] = {}

    def __init__(self, policy: StreamingVideoPolicy, trainable: str, algorithm: AlgorithmSettings) -> None:
        self.policy, self.alg = policy, algorithm
        self.sampling_adapter = trainable

    def group_backward(self, group: CandidateGroup, adv: torch.Tensor, loss_scale: float) -> GroupLoss:
        alg = self.alg
        valid = torch.nonzero(group.reward_valid).flatten()
        return sde_grpo_group_backward(self.policy, group, adv, valid, alg.effective_clip_eps, alg.sde_eta,
                                       alg.micro_batch_size, loss_scale)

    def train_step(self, groups: list[GroupWithAdvantages], optimizer: torch.optim.Optimizer,
                   guarded_step: GuardedStep, shard: GroupShard = WHOLE_BATCH) -> StepStats:
        return train_on_groups(groups, optimizer, self.alg.updates_per_iteration, self.group_backward, guarded_step,
                               shard)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
