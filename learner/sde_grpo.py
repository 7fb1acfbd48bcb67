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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

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
