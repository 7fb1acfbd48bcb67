"""AR-CoPO: the clipped contrastive GRPO objective over x0-space distances (paper Eq. 3-4).

The loss functions are pure functions of tensors; `docs/objectives.md` sets each one beside its
equation. Below them, the learner's side: one group's loss on its replayed pivot chunk
(`copo_group_loss`, `copo_group_backward` in micro-batches) and the `CopoObjective` that trains on a
batch of groups. Shapes: `S` is the shape of one chunk's latents (`f, C, H, W`), `B` the anchors, `G` the
group size.

    d_i       = mean_S (x0_old_i - x0_theta)^2                      distance of candidate i to the anchor
    pi_theta  = softmax_i(-d_i / tau)                               surrogate policy of the current model
    pi_old    = softmax_i(-d_old_i / tau),  d_old_i = mean_S (x0_old_i - x0_old_anchor)^2
    rho_i     = pi_theta(i) / pi_old(i)
    J         = 1/G sum_i min(rho_i A_i, clip(rho_i, 1-eps, 1+eps) A_i)
    loss      = -mean_B J
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from learner.settings import AlgorithmSettings
from learner.objectives.base import WHOLE_BATCH, GroupShard, GroupWithAdvantages, GuardedStep, StepStats
from learner.objectives.group_replay import GroupLoss, GroupReplay, pair_batches, replay_steps, train_on_groups
from policy.pipeline import StreamingVideoPolicy
from replay.record import CandidateGroup

Tau = float | torch.Tensor | str


class CopoLossStats(NamedTuple):
    loss: torch.Tensor  # scalar, with grad
    clip_fraction: torch.Tensor  # share of (b, i) terms where the clipped branch is strictly the smaller
    rho_mean: torch.Tensor
    rho_max_deviation: torch.Tensor  # max |rho - 1|
    distance_mean: torch.Tensor  # mean d_i under the current policy


def _check_copo_inputs(x0_theta, x0_old, anchor_index, advantages) -> None:
    if x0_old.dim() < 2:
        raise ValueError(f"x0_old must be [B, G, *S], got shape {tuple(x0_old.shape)}")
    batch, group = x0_old.shape[:2]
    if tuple(x0_theta.shape) != (batch, *x0_old.shape[2:]):
        raise ValueError(
            f"x0_theta must be [B, *S] = {(batch, *x0_old.shape[2:])} to match x0_old "
            f"{tuple(x0_old.shape)}, got {tuple(x0_theta.shape)}"
        )
    if tuple(anchor_index.shape) != (batch,) or anchor_index.dtype != torch.long:
        raise ValueError(
            f"anchor_index must be a [B]={batch} long tensor, got {tuple(anchor_index.shape)} "
            f"{anchor_index.dtype}"
        )
    if batch and (anchor_index.min() < 0 or anchor_index.max() >= group):
        raise ValueError(f"anchor_index values must lie in [0, G={group}), got {anchor_index.tolist()}")
    if tuple(advantages.shape) != (batch, group):
        raise ValueError(f"advantages must be [B, G] = {(batch, group)}, got {tuple(advantages.shape)}")


def _mean_over_sample(x: torch.Tensor, first_sample_dim: int) -> torch.Tensor:
    return x.mean(dim=tuple(range(first_sample_dim, x.dim())))


def _anchor_predictions(x0_old: torch.Tensor, anchor_index: torch.Tensor) -> torch.Tensor:
    """x0_old[b, anchor_index[b]] for every b: [B, *S]."""
    return x0_old[torch.arange(x0_old.shape[0], device=x0_old.device), anchor_index]


def auto_tau(x0_old: torch.Tensor, anchor_index: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """A temperature on the scale of the distances: the median of the off-anchor distances
    `mean_S (x0_old_i - x0_old_anchor)^2` over every anchor and every i != anchor (detached).

    With tau at the median distance, a typical candidate has `d / tau ~ 1`, so the softmax is neither
    uniform nor one-hot whatever the latent scale. `floor` keeps tau positive when all candidates coincide.
    """
    if x0_old.dim() < 2 or x0_old.shape[1] < 2:
        raise ValueError(f"auto_tau needs x0_old [B, G>=2, *S], got shape {tuple(x0_old.shape)}")
    with torch.no_grad():
        old = x0_old.detach()
        anchor = _anchor_predictions(old, anchor_index).unsqueeze(1)
        dist = _mean_over_sample((old - anchor).float().square(), 2)  # [B, G]
        off_anchor = torch.ones_like(dist, dtype=torch.bool)
        off_anchor[torch.arange(dist.shape[0], device=dist.device), anchor_index] = False
        # quantile, not median: torch's median is the lower middle value of an even count.
        return torch.quantile(dist[off_anchor].double(), 0.5).clamp_min(floor)


def _resolve_tau(tau: Tau, x0_old: torch.Tensor, anchor_index: torch.Tensor) -> torch.Tensor:
    if isinstance(tau, str):
        if tau != "auto":
            raise ValueError(f"tau must be a positive number or 'auto', got {tau!r}")
        return auto_tau(x0_old, anchor_index).double()
    tau_t = torch.as_tensor(tau, dtype=torch.float64, device=x0_old.device).detach()
    if tau_t.dim() != 0 or not bool(tau_t > 0) or not bool(torch.isfinite(tau_t)):
        raise ValueError(f"tau must be a positive finite scalar or 'auto', got {tau!r}")
    return tau_t


def copo_loss_with_stats(
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    anchor_index: torch.Tensor,
    advantages: torch.Tensor,
    tau: Tau,
    clip_eps: float | None,
) -> CopoLossStats:
    """`copo_loss` plus diagnostics. See the module docstring for the equations."""
    _check_copo_inputs(x0_theta, x0_old, anchor_index, advantages)
    if clip_eps is not None and not clip_eps > 0:
        raise ValueError(f"clip_eps must be positive or None (no clipping), got {clip_eps}")
    out_dtype = torch.promote_types(x0_theta.dtype, torch.float32)
    x0_old = x0_old.detach()
    tau_t = _resolve_tau(tau, x0_old, anchor_index)

    # Distances in (at least) float32; the [B, G] softmax and ratio in float64, because a clip of
    # 1e-4 needs the ratio resolved well below 1e-4.
    compute_dtype = out_dtype
    d_theta = _mean_over_sample((x0_old.to(compute_dtype) - x0_theta.to(compute_dtype).unsqueeze(1)).square(), 2)
    with torch.no_grad():
        anchor_old = _anchor_predictions(x0_old, anchor_index).to(compute_dtype).unsqueeze(1)
        d_old = _mean_over_sample((x0_old.to(compute_dtype) - anchor_old).square(), 2)

    log_pi_theta = torch.log_softmax(-d_theta.double() / tau_t, dim=1)
    log_pi_old = torch.log_softmax(-d_old.double() / tau_t, dim=1)
    rho = torch.exp(log_pi_theta - log_pi_old)  # [B, G]

    adv = advantages.detach().double()
    unclipped = rho * adv
    if clip_eps is None:
        objective = unclipped
        clipped_active = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped = torch.clamp(rho, 1.0 - clip_eps, 1.0 + clip_eps) * adv
        objective = torch.minimum(unclipped, clipped)
        clipped_active = clipped < unclipped
    loss = -objective.mean(dim=1).mean()

    rho_detached, d_detached = rho.detach(), d_theta.detach()
    return CopoLossStats(
        loss=loss.to(out_dtype),
        clip_fraction=clipped_active.double().mean().to(out_dtype),
        rho_mean=rho_detached.mean().to(out_dtype),
        rho_max_deviation=(rho_detached - 1.0).abs().max().to(out_dtype),
        distance_mean=d_detached.mean().to(out_dtype),
    )


def copo_loss(
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    anchor_index: torch.Tensor,
    advantages: torch.Tensor,
    tau: Tau,
    clip_eps: float | None,
) -> torch.Tensor:
    """AR-CoPO loss (negated Eq. 3 with the surrogate policy of Eq. 4), a scalar with grad.

    x0_theta [B, *S]: current x0 prediction on each anchor's input (with grad).
    x0_old [B, G, *S]: old x0 predictions of the G candidates of each anchor's group (no grad).
    anchor_index [B] long: which candidate each anchor is. advantages [B, G].
    tau: softmax temperature (positive) or "auto" (`auto_tau`). clip_eps: None disables the clip.
    """
    return copo_loss_with_stats(x0_theta, x0_old, anchor_index, advantages, tau, clip_eps).loss


def sample_anchors(group_size: int, num_anchors: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Symmetric anchor sampling: `num_anchors` distinct candidates of the group, uniformly without
    replacement, each serving once as the anchor. Returns a [num_anchors] long tensor."""
    if not 1 <= num_anchors <= group_size:
        raise ValueError(f"need 1 <= anchors ({num_anchors}) <= group size ({group_size})")
    return torch.randperm(group_size, generator=generator)[:num_anchors]


# ---------------------------------------------------------------- the learner's side
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
    x0_theta = replay_steps(policy, group, anchors, range(T)).float()  # [B, T, ...]
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
    """Back-propagate `loss_scale` x the AR-CoPO loss of `copo_group_loss`, in micro-batches of
    (anchor, step) replays (`learner.objectives.group_replay`); returns it (detached) and its stats."""
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
    replay = GroupReplay(policy, group)
    total, clip_fraction, deviation = 0.0, 0.0, 0.0
    for pairs in pair_batches(B, T, micro_batch_size):
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


class CopoObjective:
    """AR-CoPO in the learner: each optimiser step draws `anchors_per_group` anchors among every group's
    valid candidates (from the learner's checkpointed `anchor_rng`) and descends the groups' mean loss."""

    name = "copo"
    checkpoint_adapters: dict[str, str] = {}

    def __init__(self, policy: StreamingVideoPolicy, trainable: str, algorithm: AlgorithmSettings,
                 anchor_rng: torch.Generator) -> None:
        self.policy, self.alg, self.anchor_rng = policy, algorithm, anchor_rng
        self.sampling_adapter = trainable

    def draw_anchors(self, group: CandidateGroup) -> torch.Tensor:
        valid = torch.nonzero(group.reward_valid).flatten()
        return valid[sample_anchors(len(valid), min(self.alg.anchors_per_group, len(valid)), self.anchor_rng)]

    def group_backward(self, group: CandidateGroup, adv: torch.Tensor, loss_scale: float) -> GroupLoss:
        alg = self.alg
        return copo_group_backward(self.policy, group, adv, self.draw_anchors(group), alg.tau, alg.effective_clip_eps,
                                   alg.micro_batch_size, loss_scale)

    def train_step(self, groups: list[GroupWithAdvantages], optimizer: torch.optim.Optimizer,
                   guarded_step: GuardedStep, shard: GroupShard = WHOLE_BATCH) -> StepStats:
        # Another rank's group still takes its anchors from this rank's generator: the draws stay in step.
        return train_on_groups(groups, optimizer, self.alg.updates_per_iteration, self.group_backward, guarded_step,
                               shard, skip_group=self.draw_anchors)

    def state_dict(self) -> dict:
        return {}  # the anchor generator is the learner's (state.json's `anchor_rng`)

    def load_state_dict(self, state: dict) -> None:
        pass
