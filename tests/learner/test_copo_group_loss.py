"""AR-CoPO on a recorded group: the loss averages the per-step objective over the pivot chunk's first
`steps` denoising steps (all of them by default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.objectives import copo_loss
from learner.updates import copo_group_loss
from policy.noise_plan import NoisePlan
from policy.pivot_replay import replay_pivot_chunk
from policy.rollout import rollout_group
from rollout_workers.produce import make_record
from rollout_workers.tasks import RolloutTask
from tests.policy.conftest import make_policy

PROMPT = "an orange circle grows"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    policy = make_policy("tiny")
    plan = NoisePlan.from_seed(5, policy.num_chunks, policy.frames_per_chunk, policy.latent_shape, policy.num_steps)
    text = policy.text_conditioning([PROMPT])
    rollout = rollout_group(policy, text, plan.fork(pivot=1, group_size=4, sigma=0.5))
    task = RolloutTask(group_id="g", prompt=PROMPT, noise_seed=5, pivot=1, group_size=4, sigma=0.5,
                       exploration="initial_noise", adapter_name="a")
    rewards = {"TA": np.array([0.1, 0.4, 0.2, 0.9])}
    group = make_record(task, 0, rollout, "k", rewards, np.ones(4, dtype=bool))
    # perturb the weights so the current policy's x0 differs from the recorded one (a non-trivial ratio)
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return policy, text, group


def _step_loss(policy, text, group, adv, anchors, k):
    """The objective at step k alone, from an independent replay of the anchors' inputs at that step."""
    with torch.no_grad():
        x0 = replay_pivot_chunk(policy, text, group.prefix_latents, group.pivot_inputs[anchors, k],
                                group.timesteps[k].repeat(len(anchors)))
    old = group.pivot_x0[:, k][None].expand(len(anchors), *group.pivot_x0[:, k].shape)
    return float(copo_loss(x0, old, anchors, adv[None].expand(len(anchors), -1), "auto", 0.2))


def test_loss_averages_the_first_steps(setup):
    policy, text, group = setup
    adv = torch.tensor([-1.0, 0.5, -0.5, 1.0], dtype=torch.float64)
    anchors = torch.tensor([0, 3])
    per_step = [_step_loss(policy, text, group, adv, anchors, k) for k in range(group.num_steps)]
    with torch.no_grad():
        every = copo_group_loss(policy, group, adv, anchors, "auto", 0.2)
        first = copo_group_loss(policy, group, adv, anchors, "auto", 0.2, steps=1)
        two = copo_group_loss(policy, group, adv, anchors, "auto", 0.2, steps=2)
        beyond = copo_group_loss(policy, group, adv, anchors, "auto", 0.2, steps=99)
    assert float(every.loss) == pytest.approx(np.mean(per_step), rel=1e-4, abs=1e-7)
    assert float(first.loss) == pytest.approx(per_step[0], rel=1e-4, abs=1e-7)
    assert float(two.loss) == pytest.approx(np.mean(per_step[:2]), rel=1e-4, abs=1e-7)
    assert float(beyond.loss) == pytest.approx(float(every.loss), rel=1e-6)
    assert len(set(round(v, 9) for v in per_step)) > 1  # the steps differ, so the choice matters
    with pytest.raises(ValueError, match="steps must be at least 1"):
        copo_group_loss(policy, group, adv, anchors, "auto", 0.2, steps=0)
