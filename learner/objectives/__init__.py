"""The training objectives, one module each beside its pure loss, chosen once from `algorithm.objective`.

    copo        AR-CoPO (the paper's method)                  `learner.objectives.copo`
    sde_grpo    SDE-GRPO (DanceGRPO / Flow-GRPO baseline)     `learner.objectives.sde_grpo`
    nft         Astrolabe NFT (forward-process baseline)      `learner.objectives.nft`

A new objective implements `Objective` (`learner.objectives.base`) and adds its builder to `make_objective`.
"""

from __future__ import annotations

import torch

from learner.settings import AlgorithmSettings
from reward_service.settings import RewardSettings
from learner.objectives.base import Objective, StepStats
from learner.objectives.copo import CopoObjective
from learner.objectives.nft.objective import NftObjective
from learner.objectives.sde_grpo import SdeGrpoObjective
from policy.pipeline import StreamingVideoPolicy

__all__ = ["Objective", "StepStats", "make_objective"]


def make_objective(
    policy: StreamingVideoPolicy,
    trainable: str,
    algorithm: AlgorithmSettings,
    reward: RewardSettings,
    seed: int,
    anchor_rng: torch.Generator,
) -> Objective:
    """The objective `algorithm.objective` names, training the adapter `trainable` on `policy`.
    `anchor_rng` is the learner's checkpointed generator of AR-CoPO's anchor draws."""
    builders = {
        "copo": lambda: CopoObjective(policy, trainable, algorithm, anchor_rng),
        "sde_grpo": lambda: SdeGrpoObjective(policy, trainable, algorithm),
        "nft": lambda: NftObjective(policy, trainable, algorithm, reward, seed),
    }
    if algorithm.objective not in builders:
        raise ValueError(f"algorithm.objective={algorithm.objective!r} is not one of {sorted(builders)}")
    return builders[algorithm.objective]()
