"""A simulated rollout worker that plants poison: for the group ids its plan names, it turns the group
it produced into one the codec accepts but the learner cannot use, just before pushing it.

Ray worker processes import this module by name (the fault tests put this directory on their
PYTHONPATH)."""

from __future__ import annotations

import math

import torch

from replay.synthetic import synthetic_group
from rollout_workers.simulated import SimulatedRolloutWorker

# Each kind of poison, and the quarantine reason the learner must give for it.
POISONS = {
    "nan_reward": "reward",
    "wrong_geometry": "geometry",
    "zero_size": "geometry",
    "nan_pivot_x0": "nonfinite",
    "inf_pivot_inputs": "nonfinite",
    "unencodable_prompt": "prompt",
    "future_version": "policy_version",
}


def poisoned(group, kind: str, geometry: dict[str, int]):
    if kind == "nan_reward":
        head = sorted(group.rewards)[0]
        scores = group.rewards[head].clone()
        scores[int(torch.nonzero(group.reward_valid)[0])] = math.nan  # marked valid
        return group.model_copy(update={"rewards": dict(group.rewards, **{head: scores})})
    if kind in ("wrong_geometry", "zero_size"):
        changed = {"height": geometry["height"] // 2} if kind == "wrong_geometry" else {"width": 0}
        other = synthetic_group(**{**geometry, **changed}, group_size=group.group_size, pivot=group.pivot,
                                group_id=group.group_id, policy_version=group.policy_version, heads=tuple(group.rewards))
        return other.model_copy(update={"prompt": group.prompt, "rewards": group.rewards, "reward_valid": group.reward_valid})
    if kind == "nan_pivot_x0":
        x0 = group.pivot_x0.clone()
        x0[0, -1].view(-1)[0] = math.nan
        return group.model_copy(update={"pivot_x0": x0})
    if kind == "inf_pivot_inputs":
        inputs = group.pivot_inputs.clone()
        inputs[-1, 0].view(-1)[-1] = -math.inf
        return group.model_copy(update={"pivot_inputs": inputs})
    if kind == "unencodable_prompt":
        return group.model_copy(update={"prompt": group.prompt + " wearing a tiny hat"})
    if kind == "future_version":
        return group.model_copy(update={"policy_version": group.policy_version + 1000})
    raise ValueError(f"unknown poison {kind!r}")


class PoisonRolloutWorker(SimulatedRolloutWorker):
    """`plan` maps the end of a group id (e.g. `it000001-0002`) to a kind of poison (POISONS)."""

    def __init__(self, config, name, reward_server, store_url, *args, plan: dict[str, str], **kwargs) -> None:
        super().__init__(config, name, reward_server, store_url, *args, **kwargs)
        self.plan = dict(plan)

    def store_group(self, group, task, rollout_s, reward_s):
        kind = next((k for suffix, k in self.plan.items() if task.group_id.endswith(suffix)), None)
        if kind is not None:
            group = poisoned(group, kind, self.geometry)
        return super().store_group(group, task, rollout_s, reward_s)
