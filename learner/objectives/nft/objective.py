"""Astrolabe NFT inside the learner: the extra adapters, the regularisers, the EMA, one iteration.

Three LoRA adapters live on the learner's transformer:

    trainable   the run's adapter (the optimiser's parameters)
    old         `nft_old`: an EMA of the trainable one; the sampling policy (what the learner broadcasts)
    reference   `nft_ref`: the selective regulariser's anchor, hard-copied from the trainable adapter
                when the dynamic-reference controller says so

One iteration (an Astrolabe "epoch") on the groups the rollouts produced with the old adapter:

    1  dynamic reference: maybe copy trainable -> reference          (DynamicReferenceController)
    2  selective regularisation: rank disagreement between the main reward (the weighted
       combination) and the auxiliary heads over the batch's samples -> the uncertain samples
                                                                      (SelectiveRegController)
    3  `updates_per_iteration` optimiser steps; each runs `nft_group_update` on every group's
       window of chunks (from the pivot on), in micro-batches of `nft_micro_batch` branches, one raw
       timestep per (micro-batch, chunk); the loss is the mean over groups, chunks and samples
    4  old = d old + (1 - d) trainable,  d = min(rate * optimiser steps, max)   (ema_decay)

Everything random (timesteps, forward noise) comes from the trainer's own generator, which is
checkpointed with the controllers and the step counters: a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from learner.settings import AlgorithmSettings
from reward_service.settings import RewardSettings
from learner.objectives.base import WHOLE_BATCH, GroupShard, GroupWithAdvantages, GuardedStep, StepStats, mean
from learner.objectives.nft.loss import (
    NFT_TIMESTEPS,
    DynamicReferenceController,
    SelectiveRegController,
    ema_decay,
    ema_update_,
    nft_reward_weight,
    reward_disagreement,
    select_uncertain,
)
from learner.objectives.nft.streaming import AdapterSwitch, NftAdapters, NftChunkStats, nft_group_update
from policy.lora import attach_adapter, export_adapter_state, import_adapter_state, set_active_adapter
from policy.lora_precision import keep_adapter_in_float32
from policy.pipeline import StreamingVideoPolicy
from replay.record import CandidateGroup
from reward_service.multi_reward import combine

log = logging.getLogger(__name__)

OLD_ADAPTER = "nft_old"
REFERENCE_ADAPTER = "nft_ref"
# Checkpoint directory of each extra adapter (beside `adapter/`, the trainable one).
CHECKPOINT_ADAPTERS = {"adapter_nft_old": OLD_ADAPTER, "adapter_nft_ref": REFERENCE_ADAPTER}


def nft_window(group: CandidateGroup, window_chunks: int | None) -> range:
    """Chunks trained on a group: from the pivot (the first chunk the fork changed) for
    `window_chunks` chunks, cut at the video's end; None trains every chunk from the pivot on."""
    stop = group.num_chunks if window_chunks is None else min(group.pivot + window_chunks, group.num_chunks)
    return range(group.pivot, stop)


class NftObjective:
    name = "nft"
    checkpoint_adapters = CHECKPOINT_ADAPTERS

    def __init__(
        self,
        policy: StreamingVideoPolicy,
        trainable: str,
        algorithm: AlgorithmSettings,
        reward: RewardSettings,
        seed: int,
    ) -> None:
        if algorithm.objective != "nft":
            raise ValueError(f"NftObjective trains algorithm.objective=nft, not {algorithm.objective!r}")
        if algorithm.mode != "on_policy":
            raise ValueError(f"algorithm.objective=nft trains on-policy only; algorithm.mode={algorithm.mode!r}")
        self.policy, self.alg, self.weights = policy, algorithm, dict(reward.weights)
        self.aux_heads = list(algorithm.nft_aux_heads) if algorithm.nft_aux_heads is not None else list(self.weights)
        if algorithm.nft_selective_reg and (not self.aux_heads or (algorithm.nft_aux_heads is None and len(self.weights) < 2)):
            raise ValueError(
                "algorithm.nft_selective_reg needs auxiliary rewards that differ from the main one: weight at "
                "least two heads in reward.weights or name algorithm.nft_aux_heads"
            )
        self.adapters = NftAdapters(trainable, OLD_ADAPTER, REFERENCE_ADAPTER if algorithm.nft_selective_reg else None)
        transformer = policy.transformer
        config = transformer.peft_config[trainable]
        start = export_adapter_state(transformer, trainable)
        for name in (OLD_ADAPTER, REFERENCE_ADAPTER):
            attach_adapter(transformer, name, rank=config.r, alpha=config.lora_alpha, target_modules=sorted(config.target_modules))
            keep_adapter_in_float32(transformer, name)  # the EMA of small steps would round away in bf16
            import_adapter_state(transformer, name, start)  # both start equal to the trainable adapter
        set_active_adapter(transformer, trainable)
        transformer.to(policy.device)
        self.switch = AdapterSwitch(transformer, trainable)
        self.selective = SelectiveRegController()
        self.reference = DynamicReferenceController()
        self.generator = torch.Generator().manual_seed(seed + 3)
        self.steps = 0  # optimiser steps so far (the EMA schedule's clock)
        self.epoch = 0  # iterations so far
        self.last_epoch_kl: float | None = None  # largest step-mean regulariser term of the previous epoch

    @property
    def sampling_adapter(self) -> str:
        """The adapter rollouts come from (Astrolabe samples with the old adapter)."""
        return OLD_ADAPTER

    # ------------------------------------------------------------------ regularisers and EMA
    def begin_epoch(self) -> bool:
        """Dynamic reference: copy the trainable adapter into the reference when the controller says."""
        if self.adapters.reference is None:
            return False
        copy = self.reference.should_copy(self.last_epoch_kl, self.epoch)
        if copy:
            transformer = self.policy.transformer
            import_adapter_state(transformer, REFERENCE_ADAPTER, export_adapter_state(transformer, self.adapters.trainable))
            log.info("NFT reference copied from the trained adapter at epoch %d (last epoch's regulariser %s, threshold now %.3f)",
                     self.epoch, self.last_epoch_kl, self.reference.kl_threshold)
        return copy

    def select(self, groups: list[tuple[CandidateGroup, torch.Tensor]]) -> list[torch.Tensor]:
        """Per group, a bool mask over its valid branches: the samples whose main reward (the
        weighted combination) ranks them far above the auxiliary rewards, over the whole batch."""
        valid = [torch.nonzero(g.reward_valid).flatten() for g, _ in groups]
        for g, _ in groups:
            missing = [h for h in set(self.aux_heads) | set(self.weights) if h not in g.rewards]
            if missing:
                raise KeyError(f"group {g.group_id} has no reward heads {missing} (algorithm.nft_aux_heads / reward.weights)")
        main = np.concatenate([combine({h: g.rewards[h][v].numpy() for h in self.weights}, self.weights) for (g, _), v in zip(groups, valid)])
        aux = np.stack([np.concatenate([g.rewards[h][v].numpy() for (g, _), v in zip(groups, valid)]) for h in self.aux_heads])
        gap = reward_disagreement(torch.from_numpy(main), torch.from_numpy(aux))
        mask = select_uncertain(gap, self.selective.update(gap))
        return list(torch.split(mask, [len(v) for v in valid]))

    def end_epoch(self) -> float:
        """old = d old + (1 - d) trainable with d = ema_decay(optimiser steps so far); returns d."""
        decay = ema_decay(self.steps, self.alg.nft_ema_rate, self.alg.nft_ema_max)
        transformer = self.policy.transformer
        old = export_adapter_state(transformer, OLD_ADAPTER)
        ema_update_(old, export_adapter_state(transformer, self.adapters.trainable), decay)
        import_adapter_state(transformer, OLD_ADAPTER, old)
        self.epoch += 1
        return decay

    # ------------------------------------------------------------------ one iteration
    def _draws(self, window: range, branches: int) -> list[tuple[float, torch.Tensor]]:
        """One raw schedule timestep and the forward noise per (group, chunk) micro-batch."""
        f, shape = self.policy.frames_per_chunk, self.policy.latent_shape
        draws = []
        for _ in window:
            t = NFT_TIMESTEPS[int(torch.randint(len(NFT_TIMESTEPS), (1,), generator=self.generator))]
            draws.append((float(t), torch.randn((branches, f, *shape), generator=self.generator)))
        return draws

    def train_step(self, groups: list[GroupWithAdvantages], optimizer: torch.optim.Optimizer,
                   guarded_step: GuardedStep, shard: GroupShard = WHOLE_BATCH) -> StepStats:
        """One iteration (an Astrolabe epoch) on `(group, advantages [G])` pairs that carry a signal."""
        if shard.world_size > 1:  # its EMA, selection and reference statistics are taken over the whole batch
            raise NotImplementedError("NFT trains on one learner (run.num_learners=1)")
        copied = self.begin_epoch()
        masks = self.select(groups) if self.adapters.reference is not None and groups else [None] * len(groups)
        chunk_stats, grad_norms, step_kls = [], [], []
        for _ in range(self.alg.updates_per_iteration if groups else 0):
            optimizer.zero_grad(set_to_none=True)
            step = [s for (group, adv), selected in zip(groups, masks) for s in self._group_backward(group, adv, selected, len(groups))]
            stepped, grad_norm = guarded_step(sum(s.loss for s in step), [g.group_id for g, _ in groups])
            grad_norms.append(grad_norm)
            self.steps += stepped  # the EMA's clock counts the optimiser steps taken
            step_kls.append(sum(s.reg_loss for s in step) / len(step))
            chunk_stats += step
        self.last_epoch_kl = max(step_kls) if step_kls else None
        decay = self.end_epoch()
        return StepStats(loss=mean([s.loss for s in chunk_stats]), grad_norm=mean(grad_norms),
                         objective_stats=self._epoch_stats(groups, masks, chunk_stats, decay, copied))

    def _group_backward(self, group: CandidateGroup, adv: torch.Tensor, selected: torch.Tensor | None,
                        num_groups: int) -> list[NftChunkStats]:
        """Back-propagate one group's share of the step's loss over its window, in micro-batches of
        `nft_micro_batch` branches (one graph each, one timestep draw per micro-batch and chunk)."""
        alg = self.alg
        valid = torch.nonzero(group.reward_valid).flatten()
        window = nft_window(group, alg.nft_window_chunks)
        size = alg.nft_micro_batch or len(valid)
        stats = []
        for lo in range(0, len(valid), size):
            part = slice(lo, lo + size)
            branches = valid[part]
            stats += nft_group_update(
                self.policy, group, branches, nft_reward_weight(adv[branches].float()), window,
                self._draws(window, len(branches)), self.adapters, self.switch, alg.nft_beta, alg.nft_kl_beta,
                selected=None if selected is None else selected[part],
                loss_scale=len(branches) / (len(valid) * num_groups * len(window)),
            )
        return stats

    def _epoch_stats(self, groups: list[GroupWithAdvantages], masks: list, chunk_stats: list[NftChunkStats],
                     decay: float, copied: bool) -> dict[str, float | bool]:
        selective = self.adapters.reference is not None
        selected_count = sum(int(m.sum()) for m in masks if m is not None)
        samples = sum(int(g.reward_valid.sum()) for g, _ in groups)
        return {
            "nft_policy_loss": mean([s.policy_loss for s in chunk_stats]),
            "nft_kl_loss": mean([s.kl_loss for s in chunk_stats]),
            "nft_reg_loss": mean([s.reg_loss for s in chunk_stats]),
            "nft_old_deviation": mean([s.old_deviation for s in chunk_stats]),
            "nft_window_chunks": mean([float(len(nft_window(g, self.alg.nft_window_chunks))) for g, _ in groups]),
            "nft_ema_decay": decay,
            "nft_selected_fraction": selected_count / samples if samples and selective else 0.0,
            "nft_beta_sel": self.selective.beta_sel if selective else 0.0,
            "nft_reference_kl": self.last_epoch_kl if self.last_epoch_kl is not None else math.nan,
            "nft_reference_copied": copied,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "epoch": self.epoch,
            "last_epoch_kl": self.last_epoch_kl,
            "generator": self.generator.get_state().tolist(),
            "selective": self.selective.state_dict(),
            "reference": self.reference.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.steps, self.epoch = int(state["steps"]), int(state["epoch"])
            kl = state["last_epoch_kl"]
            self.last_epoch_kl = None if kl is None else float(kl)
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
            self.selective.load_state_dict(state["selective"])
            self.reference.load_state_dict(state["reference"])
        except KeyError as err:
            raise KeyError(f"NFT trainer state lacks {err}; the checkpoint was not written by an NFT run") from None

