"""The clipped ratio is taken against the policy that made the group (the paper's pi_old), whatever the
learner's weights are by the time it trains on it: the group's stored `pivot_x0`, never x0 recomputed
under the current adapter. With pipelining a group is made by the adapter one version behind the
learner's, so the two differ."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from learner.objectives.copo import copo_group_loss, copo_loss_with_stats
from learner.objectives.group_replay import replay_steps
from learner.objectives.sde_grpo import sde_grpo_group_loss
from policy.lora import attach_adapter, export_adapter_state, import_adapter_state
from pocket import domain
from pocket.preset import new_transformer, policy_from_transformer
from reward_service.result import RewardResult
from rollout_workers.produce import produce_group
from rollout_workers.tasks import RolloutTask

HEADS = ("VQ", "MQ", "TA")
ADV = torch.tensor([1.0, -0.5, 0.25, -0.75])
ANCHORS = torch.tensor([0, 2])

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _random_adapter(policy, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state = export_adapter_state(policy.transformer, "on_policy")
    import_adapter_state(policy.transformer, "on_policy", {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in state.items()})


@pytest.fixture(scope="module")
def policies_and_groups():
    """The producing policy (adapter version 'v-1'), the learner's (a different adapter: version 'v'),
    and a group of each exploration made by the producer."""
    producer = policy_from_transformer(new_transformer(0))
    attach_adapter(producer.transformer, "on_policy", rank=4, alpha=8)
    _random_adapter(producer, 0)
    learner = copy.deepcopy(producer)
    _random_adapter(learner, 1)
    rng = np.random.default_rng(0)
    score = lambda videos, prompts: [RewardResult({h: float(rng.normal()) for h in HEADS}, True) for _ in videos]  # noqa: E731
    groups = {}
    for exploration in ("initial_noise", "renoise"):
        task = RolloutTask(group_id=exploration, prompt=domain.train_prompts()[0], noise_seed=5, pivot=1, group_size=4,
                           sigma=0.5, exploration=exploration, adapter_name="on_policy")
        groups[exploration] = produce_group(producer, task, 3, score, HEADS).group
    return producer, learner, groups


@torch.no_grad()
def test_copo_ratio_is_against_the_producing_policys_stored_x0(policies_and_groups):
    producer, learner, groups = policies_and_groups
    group = groups["initial_noise"]
    T, G = group.num_steps, group.group_size
    at_producer = copo_group_loss(producer, group, ADV, ANCHORS, "auto", 0.2)
    at_learner = copo_group_loss(learner, group, ADV, ANCHORS, "auto", 0.2)
    # Under the producer the replay gives back the stored x0: rho = 1 up to float error; under the learner it moved.
    assert at_producer.ratio_deviation < 1e-3
    assert at_learner.ratio_deviation > 100 * max(at_producer.ratio_deviation, 1e-6)
    # Independently: the stored x0 as pi_old gives the loss; x0 recomputed under the learner's weights would not.
    theta = replay_steps(learner, group, ANCHORS, range(T)).float()
    recomputed = replay_steps(learner, group, torch.arange(G), range(T)).float()

    def loss_against(old: torch.Tensor) -> float:
        adv = ADV[None].expand(len(ANCHORS), -1)
        return float(torch.stack([
            copo_loss_with_stats(theta[:, k], old[:, k][None].expand(len(ANCHORS), *old[:, k].shape), ANCHORS, adv, "auto", 0.2).loss
            for k in range(T)]).mean())

    stored = loss_against(group.pivot_x0.float())
    assert float(at_learner.loss) == pytest.approx(stored, rel=1e-5, abs=1e-7)
    assert abs(loss_against(recomputed) - stored) > 1e-3 * max(abs(stored), 1e-6)


@torch.no_grad()
def test_sde_grpo_ratio_is_against_the_producing_policys_stored_x0(policies_and_groups):
    producer, learner, groups = policies_and_groups
    group, branches = groups["renoise"], torch.arange(4)
    at_producer = sde_grpo_group_loss(producer, group, ADV, branches, 0.2, 1.0)
    at_learner = sde_grpo_group_loss(learner, group, ADV, branches, 0.2, 1.0)
    assert at_producer.ratio_deviation < 1e-3
    assert at_learner.ratio_deviation > 100 * max(at_producer.ratio_deviation, 1e-6)
    # Storing the learner's own x0 as the group's would make the ratio one: it is not what is used.
    as_if_made_by_learner = group.model_copy(update={"pivot_x0": torch.cat([
        replay_steps(learner, group, branches, range(group.num_steps)).to(group.pivot_x0.dtype)], 0)})
    assert sde_grpo_group_loss(learner, as_if_made_by_learner, ADV, branches, 0.2, 1.0).ratio_deviation < 1e-3
