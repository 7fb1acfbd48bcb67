"""Astrolabe: forward-process negative-aware fine-tuning (DiffusionNFT) and its regularisers, as pure
functions and small pure-Python controllers.

    r        = clamp((clamp(A, -c, c) / c) / 2 + 1/2, 0, 1)            reward weight in [0, 1]
    x_t      = (1 - t/1000) x0 + (t/1000) noise,   t in {1000, 750, 500, 250}
    pos      = beta x0_theta + (1 - beta) x0_old                        implicit positive policy
    neg      = (1 + beta) x0_old - beta x0_theta                        implicit negative policy
    L_policy = mean_B( r ||pos - x0||^2 + (1 - r) ||neg - x0||^2 )      (||.||^2: mean over elements)
    L        = L_policy + kl_beta mean((x0_theta - x0_base)^2)

`x0_old` comes from the "old" adapter, an EMA of the trained one (`ema_decay`, `ema_update_`).
Selective regularisation and the dynamic reference follow Astrolabe's public training script; see
docs/objectives.md for where each rule comes from and where this code departs from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

NFT_TIMESTEPS = (1000, 750, 500, 250)  # raw schedule timesteps, one drawn per micro-batch


def nft_reward_weight(advantages: torch.Tensor, adv_clip: float = 5.0) -> torch.Tensor:
    """Map advantages to a weight r in [0, 1]: A = -c -> 0, A = 0 -> 1/2, A = +c -> 1."""
    if not adv_clip > 0:
        raise ValueError(f"adv_clip must be positive, got {adv_clip}")
    clipped = torch.clamp(advantages, -adv_clip, adv_clip)
    return torch.clamp((clipped / adv_clip) / 2.0 + 0.5, 0.0, 1.0)


def nft_forward_noise(x0: torch.Tensor, noise: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Flow-matching forward process at raw timestep t in [0, 1000] (a float or one per sample, [B])."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must share one shape")
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if t.dim() == 1:
        if t.shape[0] != x0.shape[0]:
            raise ValueError(f"t must be a float or a [B]={x0.shape[0]} tensor, got {tuple(t.shape)}")
        t = t.view(-1, *([1] * (x0.dim() - 1)))
    elif t.dim() != 0:
        raise ValueError(f"t must be a float or a [B] tensor, got shape {tuple(t.shape)}")
    if bool((t < 0).any()) or bool((t > 1000).any()):
        raise ValueError("t must lie in [0, 1000] (raw schedule timesteps)")
    s = t / 1000.0
    return (1.0 - s) * x0 + s * noise


class NftLossStats(NamedTuple):
    policy_loss: torch.Tensor
    kl_loss: torch.Tensor  # mean((x0_theta - x0_base)^2), before kl_beta
    loss_pos: torch.Tensor  # batch mean of the positive branch's per-sample error
    loss_neg: torch.Tensor
    old_deviation: torch.Tensor  # mean((x0_theta - x0_old)^2)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def _branch_error(pred: torch.Tensor, target: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Per-sample mean squared error; normalised by its own detached mean absolute error if asked."""
    err = _per_sample_mean((pred - target).square())
    if not normalize:
        return err
    with torch.no_grad():
        scale = _per_sample_mean((pred.double() - target.double()).abs()).clamp_min(1e-5)
    return err / scale.to(err.dtype)


def nft_loss(
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    x0_base: torch.Tensor | None,
    x0_target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    kl_beta: float,
    normalize_errors: bool = False,
) -> tuple[torch.Tensor, NftLossStats]:
    """NFT loss on one micro-batch of re-noised endpoints.

    x0_theta [B, *S] trainable adapter's x0 prediction (with grad); x0_old the EMA "old" adapter's,
    x0_base the frozen reference's (None when kl_beta is 0), x0_target the clean rollout endpoint the
    input was noised from; r [B] from `nft_reward_weight`.

    normalize_errors=False is what Astrolabe's public script computes. True follows DiffusionNFT:
    each branch's per-sample error is divided by its own detached mean absolute error, and the policy
    term by beta.
    """
    if not (x0_theta.shape == x0_old.shape == x0_target.shape):
        raise ValueError(
            f"x0_theta, x0_old and x0_target must share one shape, got {tuple(x0_theta.shape)}, "
            f"{tuple(x0_old.shape)}, {tuple(x0_target.shape)}"
        )
    if r.shape != x0_theta.shape[:1]:
        raise ValueError(f"r must be [B]={x0_theta.shape[0]}, got {tuple(r.shape)}")
    if not beta > 0 or kl_beta < 0:
        raise ValueError(f"beta must be positive and kl_beta non-negative, got {beta}, {kl_beta}")
    if x0_base is None and kl_beta != 0:
        raise ValueError("x0_base is needed when kl_beta is not 0")
    if x0_base is not None and x0_base.shape != x0_theta.shape:
        raise ValueError(f"x0_base must have shape {tuple(x0_theta.shape)}, got {tuple(x0_base.shape)}")

    x0_old, x0_target, r = x0_old.detach(), x0_target.detach(), r.detach()
    positive = beta * x0_theta + (1.0 - beta) * x0_old
    negative = (1.0 + beta) * x0_old - beta * x0_theta
    loss_pos = _branch_error(positive, x0_target, normalize_errors)
    loss_neg = _branch_error(negative, x0_target, normalize_errors)
    per_sample = r * loss_pos + (1.0 - r) * loss_neg
    if normalize_errors:
        per_sample = per_sample / beta
    policy_loss = per_sample.mean()

    if x0_base is None:
        kl_loss = torch.zeros((), dtype=policy_loss.dtype, device=policy_loss.device)
    else:
        kl_loss = (x0_theta - x0_base.detach()).square().mean()
    loss = policy_loss + kl_beta * kl_loss
    stats = NftLossStats(
        policy_loss=policy_loss.detach(),
        kl_loss=kl_loss.detach(),
        loss_pos=loss_pos.detach().mean(),
        loss_neg=loss_neg.detach().mean(),
        old_deviation=(x0_theta.detach() - x0_old).square().mean(),
    )
    return loss, stats


# ---------------------------------------------------------------- the EMA "old" adapter
def ema_decay(step: int, rate: float = 0.001, max_decay: float = 0.5) -> float:
    """Decay of the old adapter after `step` optimiser steps: min(rate * step, max_decay).

    It starts at 0 (old = current: fully on-policy) and slowly lets the old adapter lag."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return min(rate * step, max_decay)


@torch.no_grad()
def ema_update_(old_params: dict[str, torch.Tensor], new_params: dict[str, torch.Tensor], decay: float) -> None:
    """old = decay * old + (1 - decay) * new, in place, for every named tensor."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    if old_params.keys() != new_params.keys():
        missing = sorted(set(old_params) ^ set(new_params))
        raise KeyError(f"old and new parameters differ in names: {missing[:5]}")
    for name, old in old_params.items():
        new = new_params[name]
        if old.shape != new.shape:
            raise ValueError(f"parameter {name}: old {tuple(old.shape)} and new {tuple(new.shape)} differ")
        old.mul_(decay).add_(new.to(old.dtype), alpha=1.0 - decay)


# ---------------------------------------------------------------- uncertainty-aware selective regularisation
def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N in ascending order (the largest value gets N); ties share their average rank."""
    less = (values.unsqueeze(0) < values.unsqueeze(1)).sum(dim=1)
    equal = (values.unsqueeze(0) == values.unsqueeze(1)).sum(dim=1)
    return less.double() + (equal.double() + 1.0) / 2.0


def reward_disagreement(main_reward: torch.Tensor, aux_rewards: torch.Tensor) -> torch.Tensor:
    """Gap [N] = rank under the main reward - mean rank under the auxiliary rewards.

    Ranks are over the whole batch, ascending (higher reward, higher rank), ties averaged. A large
    positive gap: the main reward likes the sample much more than the others do, the signature of
    the main reward being hacked. main_reward [N], aux_rewards [K, N] with K >= 1.
    """
    main_reward, aux_rewards = torch.as_tensor(main_reward), torch.as_tensor(aux_rewards)
    if main_reward.dim() != 1 or aux_rewards.dim() != 2 or aux_rewards.shape[1] != main_reward.shape[0]:
        raise ValueError(
            f"need main_reward [N] and aux_rewards [K, N], got {tuple(main_reward.shape)} and {tuple(aux_rewards.shape)}"
        )
    if aux_rewards.shape[0] == 0:
        raise ValueError("reward_disagreement needs at least one auxiliary reward")
    if not (bool(torch.isfinite(main_reward).all()) and bool(torch.isfinite(aux_rewards).all())):
        raise ValueError("rewards contain NaN or inf; drop invalid samples first")
    aux_ranks = torch.stack([_average_ranks(row) for row in aux_rewards])
    return _average_ranks(main_reward) - aux_ranks.mean(dim=0)


def select_uncertain(gap: torch.Tensor, beta_sel: float) -> torch.Tensor:
    """Bool mask [N] of the ceil(beta_sel * N) samples with the largest gap, keeping only strictly
    positive gaps (a sample the main reward does not favour is never suspected). Ties at the cut go to
    the lower index."""
    if not 0.0 <= beta_sel <= 1.0:
        raise ValueError(f"beta_sel must lie in [0, 1], got {beta_sel}")
    count = math.ceil(beta_sel * gap.shape[0] - 1e-9)
    order = torch.sort(gap, descending=True, stable=True).indices[:count]
    mask = torch.zeros(gap.shape, dtype=torch.bool, device=gap.device)
    mask[order] = True
    return mask & (gap > 0)


def selective_reg_loss(x0_theta: torch.Tensor, x0_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the selected samples of their per-sample MSE to the reference adapter's prediction;
    0 (still attached to the graph) when none is selected. Weighted by kl_beta in the total loss."""
    if x0_theta.shape != x0_ref.shape or mask.shape != x0_theta.shape[:1] or mask.dtype != torch.bool:
        raise ValueError(
            f"need x0_theta and x0_ref of one shape and a bool mask [B]; got {tuple(x0_theta.shape)}, "
            f"{tuple(x0_ref.shape)}, {mask.dtype} {tuple(mask.shape)}"
        )
    if not bool(mask.any()):
        return x0_theta.sum() * 0.0
    return _per_sample_mean((x0_theta[mask] - x0_ref[mask].detach()).square()).mean()


@dataclass
class SelectiveRegController:
    """Adapts beta_sel, the fraction of samples regularised, to the reward models' disagreement.

    `update(gap)` once per batch of rewards: m = mean of the non-negative gaps (the mean of all gaps
    is always 0, ranks being a permutation). The recent range is [min, max] of the m of the previous
    `window` updates. On the first update beta_sel = initial; afterwards m above the range multiplies
    beta_sel by (1 + rate), m below it by (1 - rate); the result is clipped to [low, high].
    """

    initial: float = 0.1
    rate: float = 0.1
    low: float = 0.02
    high: float = 0.2
    window: int = 20
    beta_sel: float = 0.1
    history: list[float] = field(default_factory=list)

    def update(self, gap: torch.Tensor) -> float:
        gap = torch.as_tensor(gap, dtype=torch.float64)
        non_negative = gap[gap >= 0]
        m = float(non_negative.mean()) if non_negative.numel() else 0.0
        if not self.history:
            self.beta_sel = self.initial
        elif m > max(self.history):
            self.beta_sel *= 1.0 + self.rate
        elif m < min(self.history):
            self.beta_sel *= 1.0 - self.rate
        self.beta_sel = min(max(self.beta_sel, self.low), self.high)
        self.history = (self.history + [m])[-self.window :]
        return self.beta_sel

    def state_dict(self) -> dict:
        return {"beta_sel": self.beta_sel, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.beta_sel, self.history = float(state["beta_sel"]), [float(v) for v in state["history"]]


@dataclass
class DynamicReferenceController:
    """Decides when the regularisation reference (`old_ref`) is hard-copied from the current adapter.

    `should_copy(kl, epoch)` at the start of each epoch, with `kl` the largest regularisation term
    logged during the previous epoch (None at the first epoch). It returns True, and records the copy,
    when kl > kl_threshold (not at epoch 0) or when more than `max_epochs_without_copy` epochs passed
    since the last copy. On each copy the threshold adapts by `threshold_step` within
    [min_threshold, max_threshold]: down after a copy forced by staleness (the KL stayed low, so
    the reference may follow sooner), up after a copy fewer than `quick_copy_epochs` epochs after
    the previous one (the reference moves too often).
    """

    kl_threshold: float = 0.15
    min_threshold: float = 0.05
    max_threshold: float = 0.15
    threshold_step: float = 0.01
    max_epochs_without_copy: int = 15
    quick_copy_epochs: int = 5
    last_copy_epoch: int = 0

    def should_copy(self, kl: float | None, epoch: int) -> bool:
        if epoch < self.last_copy_epoch:
            raise ValueError(f"epoch {epoch} is before the last copy at epoch {self.last_copy_epoch}")
        since = epoch - self.last_copy_epoch
        stale = since > self.max_epochs_without_copy
        kl_high = epoch > 0 and kl is not None and kl > self.kl_threshold
        if not (stale or kl_high):
            return False
        if stale:
            self.kl_threshold = max(self.kl_threshold - self.threshold_step, self.min_threshold)
        elif since < self.quick_copy_epochs:
            self.kl_threshold = min(self.kl_threshold + self.threshold_step, self.max_threshold)
        self.last_copy_epoch = epoch
        return True

    def state_dict(self) -> dict:
        return {"kl_threshold": self.kl_threshold, "last_copy_epoch": self.last_copy_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.kl_threshold, self.last_copy_epoch = float(state["kl_threshold"]), int(state["last_copy_epoch"])
