"""What each experiment may spend: iterations, groups per iteration, group size, seeds, evaluation size.

Two budgets: `full` (the committed results; every table fits well under an hour on a 2-core CPU) and
`small` (a smoke run of a couple of minutes). Hyperparameters that are not a budget (learning rate,
clip, LoRA rank, perturbation sigma, policy updates per iteration) are the pocket configs' own
(configs/pocket.yaml, configs/pocket_nft.yaml), chosen before any experiment ran and never tuned here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from controller.config import Config

CHECKPOINT_EVERY = 4  # iterations


@dataclass(frozen=True)
class Budget:
    name: str
    iterations: int
    groups_per_iteration: int
    group_size: int
    anchors_per_group: int
    buffer_groups: int  # semi-/off-policy reference buffer (groups rolled out once from the base policy)
    eval_prompts: int | None  # held-out prompts of the final evaluation (one video each); None: all 72
    seeds: int  # default number of training seeds (run.seed = 0..seeds-1)
    entropy_seeds: int  # frozen noise plans of the Figure 6 study
    num_workers: int  # rollout workers

    def overrides(self) -> list[str]:
        """Config overrides that impose this budget on a run (the driver's own held-out evaluation is
        kept minimal: the experiments evaluate every final adapter themselves, on every head)."""
        return [
            f"run.iterations={self.iterations}",
            f"algorithm.groups_per_iteration={self.groups_per_iteration}",
            f"algorithm.group_size={self.group_size}",
            f"algorithm.anchors_per_group={self.anchors_per_group}",
            f"replay.buffer_groups={self.buffer_groups}",
            f"rollout.num_workers={self.num_workers}",
            "reward.num_actors=1",
            "run.eval_every=0",
            "run.eval_prompts_limit=2",
            # The learner acks the groups it applied when it checkpoints (unacked groups fill the replay
            # queue); checkpointing every few iterations also keeps the final adapter on disk.
            f"run.checkpoint_every={max(1, min(self.iterations, CHECKPOINT_EVERY))}",
        ]

    def describe(self, config: Config) -> str:
        """One markdown line stating the budget and the fixed hyperparameters of `config`."""
        alg, lora = config.algorithm, config.lora
        evaluation = f"{self.eval_prompts} held-out prompts" if self.eval_prompts else "all 72 held-out prompts"
        if alg.objective == "nft":
            objective = (f"NFT beta {alg.nft_beta:g}, window {alg.nft_window_chunks} chunks, EMA rate {alg.nft_ema_rate:g} "
                         f"(max {alg.nft_ema_max:g}), selective regularisation {'on' if alg.nft_selective_reg else 'off'}")
        else:
            objective = f"anchors {self.anchors_per_group}, clip {alg.clip_eps:g}"
        return (
            f"Budget `{self.name}`: {self.iterations} iterations x {self.groups_per_iteration} groups/iteration x "
            f"G = {self.group_size}, {alg.updates_per_iteration} updates/iteration, lr {alg.learning_rate:g}, {objective}, "
            f"LoRA rank {lora.rank} / alpha {lora.alpha:g}, sigma {alg.perturbation_sigma:g}, reference buffer "
            f"{self.buffer_groups} groups; {self.num_workers} rollout worker(s), 1 reward actor; evaluation on {evaluation}, "
            "one video each."
        )

    def as_dict(self) -> dict:
        return asdict(self)


BUDGETS: dict[str, Budget] = {
    "full": Budget("full", iterations=80, groups_per_iteration=4, group_size=8, anchors_per_group=4,
                   buffer_groups=32, eval_prompts=None, seeds=2, entropy_seeds=8, num_workers=2),
    "small": Budget("small", iterations=2, groups_per_iteration=2, group_size=4, anchors_per_group=2,
                    buffer_groups=2, eval_prompts=8, seeds=1, entropy_seeds=2, num_workers=1),
}


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; known: {sorted(BUDGETS)}")
    return BUDGETS[name]
