"""How much a forked group's rewards differ: the signal a group-relative objective has to learn from.

For groups of G branches forked at a random pivot chunk, the mean over groups of each head's
within-group standard deviation, for AR-CoPO's fork (the pivot chunk's initial noise,
``sqrt(1 - s^2) eps + s delta``) and for SDE-GRPO's (the pivot chunk's re-noise draws). Group
advantages are normalised by this spread, so where it is tiny they rank branches by small
differences of the verifiers.

    python -m experiments.pocket_studies.fork_spread --groups 24
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall shared CPUs

import argparse

import numpy as np
import torch

from policy.pipeline import StreamingVideoPolicy
from reward_service.base import RewardModel
from reward_service.scoring import score_isolated
from rollout_workers.produce import produce_group
from rollout_workers.tasks import RolloutTask

EXPLORATIONS = ("initial_noise", "renoise")


@torch.no_grad()
def fork_spread(
    policy: StreamingVideoPolicy,
    reward: RewardModel,
    prompts: list[str],
    groups: int,
    group_size: int = 8,
    sigma: float = 0.5,
    seed: int = 0,
    pivot: int | None = None,
) -> dict[str, dict[str, float]]:
    """{exploration: {head: mean within-group std}} plus a "sum" head (the equally weighted total).

    `pivot`: fork every group at this chunk (None: a uniformly drawn chunk per group)."""
    if pivot is not None and not 0 <= pivot < policy.num_chunks:
        raise ValueError(f"pivot {pivot} outside the policy's {policy.num_chunks} chunks")
    heads = tuple(reward.heads)
    score = lambda videos, texts: score_isolated([reward], videos, texts)  # noqa: E731
    out = {}
    for exploration in EXPLORATIONS:
        rng = np.random.default_rng(seed)  # the same prompts, noises and pivots for both forks
        stds = []
        for k in range(groups):
            task = RolloutTask(
                group_id=f"spread-{k}", prompt=prompts[int(rng.integers(len(prompts)))], noise_seed=int(rng.integers(2**62)),
                pivot=int(rng.integers(policy.num_chunks)) if pivot is None else pivot, group_size=group_size, sigma=sigma, exploration=exploration,
                adapter_name="spread",
            )
            group = produce_group(policy, task, 0, score, heads).group
            rewards = {h: group.rewards[h].numpy() for h in heads}
            rewards["sum"] = sum(rewards[h] for h in heads)
            stds.append({h: float(np.std(v)) for h, v in rewards.items()})
        out[exploration] = {h: float(np.mean([s[h] for s in stds])) for h in stds[0]}
    return out


def main(argv: list[str] | None = None) -> None:
    from pocket import domain, load_pocket_policy
    from reward_service import build_reward

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="pocket weights directory (default: the shipped weights)")
    parser.add_argument("--groups", type=int, default=24)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--per-pivot", action="store_true", help="one row per pivot chunk (--groups groups at each)")
    args = parser.parse_args(argv)
    policy = load_pocket_policy(args.weights) if args.weights else load_pocket_policy()
    pivots = list(range(policy.num_chunks)) if args.per_pivot else [None]
    labels = {"initial_noise": f"initial noise (AR-CoPO, s = {args.sigma:g})", "renoise": "re-noise (SDE-GRPO)"}
    where = "pivot fixed per row" if args.per_pivot else "pivot ~ U(chunks)"
    print(f"Mean within-group reward std, {args.groups} groups of G = {args.group_size}, training prompts, {where}\n")
    for pivot in pivots:
        spread = fork_spread(policy, build_reward("pocket"), domain.train_prompts(), args.groups, args.group_size,
                             args.sigma, pivot=pivot)
        heads = list(next(iter(spread.values())))
        if pivot in (None, 0):
            print("| pivot | fork | " + " | ".join(heads) + " |")
            print("|---|---|" + "---|" * len(heads))
        for exploration, row in spread.items():
            print(f"| {'U' if pivot is None else pivot} | {labels[exploration]} | " + " | ".join(f"{row[h]:.4f}" for h in heads) + " |")


if __name__ == "__main__":
    main()
