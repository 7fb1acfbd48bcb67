"""Forked group rollouts: shared prefix, branch structure, determinism, counted forward passes."""

from __future__ import annotations

import pytest
import torch

from policy.noise_plan import NoisePlan
from policy.rollout import generate, rollout_group
from tests.policy.conftest import make_policy


@pytest.fixture(scope="module")
def policy():
    return make_policy("tiny-framewise")  # 5 chunks of 1 frame, 4 steps


@pytest.fixture(scope="module")
def text(policy):
    return policy.text_conditioning(["a green dot bounces"])


def base_plan(policy, seed=11):
    return NoisePlan.from_seed(seed, policy.num_chunks, policy.frames_per_chunk, policy.latent_shape, policy.num_steps)


class ForwardCounter:
    """Counts videos through the patch embedding: one per video per chunk forward, whatever the path."""

    def __init__(self, model):
        self.videos = 0
        self.handle = model.patch_embedding.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.videos += args[0].shape[0]

    def close(self):
        self.handle.remove()


def test_branches_match_independent_rollouts_and_share_the_prefix(policy, text):
    group_plan = base_plan(policy).fork(pivot=2, group_size=3, sigma=0.5)
    group = rollout_group(policy, text, group_plan)
    f = policy.frames_per_chunk
    prefix_end = 2 * f
    for i in range(3):
        alone = generate(policy, text, group_plan.branch(i)).latents
        assert torch.equal(group.latents[i, :prefix_end], alone[:prefix_end])  # same batch-1 computation
        assert (group.latents[i] - alone).abs().max() < 1e-5  # batched vs alone: same numbers
    assert torch.equal(group.prefix_latents, group.latents[0, :prefix_end])
    for i in (1, 2):  # the pivot chunk differs, and through the context so does every later chunk
        diff = (group.latents[i] - group.latents[0]).abs().amax(dim=(1, 2, 3))
        assert diff[prefix_end : prefix_end + f].min() > 1e-2
        assert diff[prefix_end + f :].min() > 1e-5  # well above batched-vs-alone rounding (< 1e-6)


def test_pivot_trajectory_is_recorded(policy, text):
    group_plan = base_plan(policy).fork(pivot=1, group_size=2, sigma=0.5)
    group = rollout_group(policy, text, group_plan)
    T, f = policy.num_steps, policy.frames_per_chunk
    assert group.pivot_inputs.shape == (2, T, f, *policy.latent_shape) == group.pivot_x0.shape
    assert torch.equal(group.pivot_inputs[:, 0], group_plan.pivot_initial)
    assert torch.equal(group.pivot_x0[:, -1], group.latents[:, f : 2 * f])
    assert torch.equal(group.timesteps, policy.timesteps())
    assert group.final_latents is group.latents
    assert rollout_group(policy, text, group_plan, record_final_latents=False).final_latents is None


def test_sigma_zero_gives_identical_branches_and_seed_reproduces(policy, text):
    plan = base_plan(policy)
    same = rollout_group(policy, text, plan.fork(pivot=1, group_size=3, sigma=0.0))
    assert all(torch.equal(same.latents[0], same.latents[i]) for i in (1, 2))
    first = rollout_group(policy, text, plan.fork(pivot=1, group_size=3, sigma=0.5))
    second = rollout_group(policy, text, base_plan(policy).fork(pivot=1, group_size=3, sigma=0.5))
    assert torch.equal(first.latents, second.latents) and torch.equal(first.pivot_x0, second.pivot_x0)


def test_renoise_fork_differs_only_after_the_pivot_first_step(policy, text):
    group = rollout_group(policy, text, base_plan(policy).fork_renoise(pivot=2, group_size=3))
    f = policy.frames_per_chunk
    assert group.exploration == "renoise"
    assert all(torch.equal(group.pivot_x0[0, 0], group.pivot_x0[i, 0]) for i in (1, 2))  # shared initial noise
    assert all(not torch.equal(group.pivot_inputs[0, 1], group.pivot_inputs[i, 1]) for i in (1, 2))
    assert all(torch.equal(group.latents[0, : 2 * f], group.latents[i, : 2 * f]) for i in (1, 2))
    assert all(not torch.equal(group.latents[0, 2 * f :], group.latents[i, 2 * f :]) for i in (1, 2))


@pytest.mark.parametrize("pivot", [0, 2, 4])
def test_forked_group_costs_the_paper_fraction_of_independent_rollouts(policy, text, pivot):
    G, L, T = 3, policy.num_chunks, policy.num_steps
    group_plan = base_plan(policy).fork(pivot=pivot, group_size=G, sigma=0.5)
    counter = ForwardCounter(policy.transformer)
    try:
        group = rollout_group(policy, text, group_plan)
        forked = counter.videos
        counter.videos = 0
        for i in range(G):
            generate(policy, text, group_plan.branch(i))
        independent = counter.videos
    finally:
        counter.close()
    p = pivot + 1  # the paper's 1-based pivot
    assert group.forward_passes == forked
    assert independent == G * L * (T + 1)
    assert forked / independent == pytest.approx(((p - 1) + G * (L - p + 1)) / (G * L), abs=1e-12)


def test_branch_sub_batches_give_the_same_group(policy, text):
    group_plan = base_plan(policy).fork(pivot=1, group_size=3, sigma=0.5)
    batched = rollout_group(policy, text, group_plan)
    sequential = rollout_group(policy, text, group_plan, branch_batch_size=1)
    assert (batched.latents - sequential.latents).abs().max() < 1e-5
    assert (batched.pivot_x0 - sequential.pivot_x0).abs().max() < 1e-5
    assert batched.forward_passes == sequential.forward_passes


def test_generate_counts_and_checks_its_inputs(policy, text):
    video = generate(policy, text, base_plan(policy))
    assert video.latents.shape == (policy.num_frames, *policy.latent_shape)
    assert video.forward_passes == policy.num_chunks * (policy.num_steps + 1)
    with pytest.raises(ValueError, match="one prompt"):
        generate(policy, torch.cat([text, text]), base_plan(policy))
    wrong = NoisePlan.from_seed(0, policy.num_chunks + 1, 1, policy.latent_shape, policy.num_steps)
    with pytest.raises(ValueError, match="noise plan"):
        generate(policy, text, wrong)


def test_window_policy_group_matches_independent_rollouts():
    policy = make_policy("tiny-window")  # 6 one-frame chunks, window 4 with 1 sink: evicts from chunk 4
    text = policy.text_conditioning(["a yellow line"])
    group_plan = base_plan(policy).fork(pivot=3, group_size=2, sigma=0.5)
    group = rollout_group(policy, text, group_plan)
    for i in range(2):
        assert (group.latents[i] - generate(policy, text, group_plan.branch(i)).latents).abs().max() < 1e-5
