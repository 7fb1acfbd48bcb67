"""The objective is chosen once: `make_objective` builds the one `algorithm.objective` names, each
satisfies the `Objective` protocol the learner actor trains with, and the shared optimiser-step loop of
the pivot-replay objectives averages the groups' losses as the learner did inline."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from learner.settings import AlgorithmSettings
from reward_service.settings import RewardSettings
from learner.objectives import Objective, make_objective
from learner.objectives.copo import CopoObjective
from learner.objectives.group_replay import GroupLoss, train_on_groups
from learner.objectives.nft.objective import OLD_ADAPTER, REFERENCE_ADAPTER, NftObjective
from learner.objectives.sde_grpo import SdeGrpoObjective
from policy.lora import adapter_names, attach_adapter
from pocket.preset import new_transformer, policy_from_transformer


@pytest.fixture(scope="module")
def base():
    return policy_from_transformer(new_transformer(0))


@pytest.mark.parametrize("name, kind, sampling, extra", [
    ("copo", CopoObjective, "trained", {}),
    ("sde_grpo", SdeGrpoObjective, "trained", {}),
    ("nft", NftObjective, OLD_ADAPTER, {"adapter_nft_old": OLD_ADAPTER, "adapter_nft_ref": REFERENCE_ADAPTER}),
])
def test_make_objective_builds_the_configured_objective(base, name, kind, sampling, extra):
    policy = copy.deepcopy(base)
    attach_adapter(policy.transformer, "trained", rank=2, alpha=4)
    rng = torch.Generator().manual_seed(5)
    objective = make_objective(policy, "trained", AlgorithmSettings(objective=name), RewardSettings(), 0, rng)
    assert type(objective) is kind and isinstance(objective, Objective)
    assert objective.name == name and objective.sampling_adapter == sampling
    assert objective.checkpoint_adapters == extra
    assert sampling in adapter_names(policy.transformer)  # what the learner broadcasts exists
    assert all(a in adapter_names(policy.transformer) for a in extra.values())
    if kind is CopoObjective:
        assert objective.anchor_rng is rng  # the learner's checkpointed generator draws the anchors
        assert objective.state_dict() == {}
    if kind is NftObjective:
        assert set(objective.state_dict()) == {"steps", "epoch", "last_epoch_kl", "generator", "selective", "reference"}


def test_an_unknown_objective_is_refused_by_name(base):
    algorithm = AlgorithmSettings.model_construct(**{**AlgorithmSettings().model_dump(), "objective": "ppo"})
    with pytest.raises(ValueError, match=r"algorithm.objective='ppo' is not one of \['copo', 'nft', 'sde_grpo'\]"):
        make_objective(base, "trained", algorithm, RewardSettings(), 0, torch.Generator())


class _Group:
    def __init__(self, group_id: str) -> None:
        self.group_id = group_id


def test_each_step_descends_the_mean_of_the_groups_losses():
    groups = [(_Group("a"), torch.zeros(2)), (_Group("b"), torch.zeros(2))]
    losses = iter([1.0, 3.0, 5.0, 11.0])  # two steps of two groups
    calls, steps = [], []

    def group_backward(group, adv, loss_scale):
        calls.append((group.group_id, loss_scale))
        return GroupLoss(torch.tensor(next(losses)), clip_fraction=0.25 * len(calls), ratio_deviation=float(len(calls)))

    def guarded_step(loss, group_ids):
        steps.append((loss, group_ids))
        return True, 10.0 * len(steps)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    stats = train_on_groups(groups, optimizer, 2, group_backward, guarded_step)
    assert calls == [("a", 0.5), ("b", 0.5), ("a", 0.5), ("b", 0.5)]  # each group's share of the mean
    assert steps == [(2.0, ["a", "b"]), (8.0, ["a", "b"])]
    assert stats.loss == 5.0 and stats.grad_norm == 15.0
    assert stats.clip_fraction == pytest.approx((0.25 + 0.5 + 0.75 + 1.0) / 4) and stats.ratio_max_deviation == 4.0
    assert stats.objective_stats == {}


def test_no_groups_take_no_step():
    def fail(*args):
        raise AssertionError("called without a group")

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    stats = train_on_groups([], optimizer, 3, fail, fail)
    assert math.isnan(stats.loss) and math.isnan(stats.grad_norm) and stats.ratio_max_deviation == 0.0
