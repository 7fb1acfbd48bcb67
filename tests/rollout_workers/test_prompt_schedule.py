"""A rollout task with prompts per chunk: produced, stored, decoded and replayed by the learner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from learner.objectives.copo import copo_group_loss
from policy.noise_plan import NoisePlan
from policy.recache import encode_schedule
from policy.rollout import generate
from replay.codec import decode, encode
from reward_service.result import RewardResult
from rollout_workers.produce import eval_latents, produce_group
from rollout_workers.tasks import RolloutTask
from tests.policy.conftest import make_policy

A, B = "a paper boat drifts", "rain starts to fall on the boat"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


class BlankCodec:
    fps = 8.0

    def decode(self, latents):
        return np.zeros((latents.shape[0], latents.shape[1], 4, 4, 3), np.uint8)


def score(videos, prompts):
    return [RewardResult({"VQ": float(i)}, True) for i in range(len(videos))]


def task(**kw):
    base = dict(group_id="g", prompt=A, noise_seed=4, pivot=7, group_size=3, sigma=0.5, adapter_name="policy",
                prompt_schedule=[(0, A), (3, B)])
    return RolloutTask(**{**base, **kw})


def test_task_schedule_is_validated():
    assert task().prompt_schedule == ((0, A), (3, B))
    with pytest.raises(ValidationError, match="start at chunk 0"):
        task(prompt_schedule=[(2, B)])


def test_scheduled_group_round_trips_and_replays_on_policy():
    policy = make_policy("tiny-window", num_chunks=10)  # window 4, so pivot 7 re-caches
    policy.codec = BlankCodec()
    produced = produce_group(policy, task(), 0, score, ("VQ",))
    group = decode(encode(produced.group))
    assert group.prompt_schedule == [(0, A), (3, B)] and group.prompt == A
    # branch 0 is the video a lone rollout of that branch makes with the same switches
    plan = NoisePlan.from_seed(4, 10, 1, policy.latent_shape, policy.num_steps).fork(7, 3, 0.5)
    alone = generate(policy, encode_schedule(policy, [(0, A), (3, B)]), plan.branch(0), recache_at={7})
    assert (group.prefix_latents - alone.latents[:7]).abs().max() < 1e-6
    advantages, anchors = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0, 2])
    on_policy = copo_group_loss(policy, group, advantages, anchors, tau=1.0, clip_eps=None)
    assert on_policy.ratio_deviation < 1e-4  # the learner's rebuilt context is the rollout's
    one_prompt = group.model_copy(update={"schedule_chunks": [], "schedule_prompts": []})
    assert copo_group_loss(policy, one_prompt, advantages, anchors, tau=1.0, clip_eps=None).ratio_deviation > 1e-3


def test_evaluation_videos_follow_their_schedule():
    policy = make_policy("tiny-window", num_chunks=6)
    one = eval_latents(policy, A, seed=2)
    switched = eval_latents(policy, A, seed=2, prompt_schedule=[(0, A), (4, B)])
    expected = generate(policy, encode_schedule(policy, [(0, A), (4, B)]),
                        NoisePlan.from_seed(2, 6, 1, policy.latent_shape, policy.num_steps)).latents
    assert torch.equal(switched, expected)
    assert torch.equal(one[:4], switched[:4]) and (one[4:] - switched[4:]).abs().max() > 1e-3
