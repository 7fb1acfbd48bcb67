"""Noise plans: every draw explicit and seeded; forks differ only where they should."""

from __future__ import annotations

import math

import pytest
import torch

from policy.noise_plan import NoisePlan

SHAPE = (4, 8, 8)


def plan(seed=7, chunks=4, f=3, steps=4):
    return NoisePlan.from_seed(seed, chunks, f, SHAPE, steps)


def test_plan_shapes_and_determinism():
    p = plan()
    assert p.initial.shape == (4, 3, *SHAPE) and p.renoise.shape == (4, 3, 3, *SHAPE)
    again, other = plan(), plan(seed=8)
    assert torch.equal(p.initial, again.initial) and torch.equal(p.renoise, again.renoise)
    assert not torch.equal(p.initial, other.initial)
    # The draws are the seeded CPU stream in a fixed order: initial first, then re-noise.
    g = torch.Generator().manual_seed(7)
    assert torch.equal(p.initial, torch.randn((4, 3, *SHAPE), generator=g))
    assert torch.equal(p.renoise, torch.randn((4, 3, 3, *SHAPE), generator=g))


def test_fork_perturbs_only_the_pivot_initial_noise():
    p = plan()
    group = p.fork(pivot=2, group_size=5, sigma=0.5)
    assert group.deltas.shape == (5, 3, *SHAPE)
    expected = math.sqrt(1 - 0.25) * p.initial[2] + 0.5 * group.deltas
    assert torch.allclose(group.pivot_initial, expected)
    branches = [group.branch(i) for i in range(5)]
    for b in branches:
        for c in (0, 1, 3):
            assert torch.equal(b.initial[c], p.initial[c])
        assert torch.equal(b.renoise, p.renoise)
    assert all(not torch.equal(branches[0].initial[2], b.initial[2]) for b in branches[1:])
    # deterministic, and sigma = 0 gives G exact copies of the base noise
    assert torch.equal(p.fork(2, 5, 0.5).pivot_initial, group.pivot_initial)
    zero = p.fork(2, 5, 0.0)
    assert all(torch.equal(zero.pivot_initial[i], p.initial[2]) for i in range(5))
    # the perturbed noise keeps unit variance
    big = NoisePlan.from_seed(1, 1, 1, (16, 32, 32), 2).fork(0, 8, 0.5)
    assert abs(big.pivot_initial.std().item() - 1.0) < 0.02


def test_fork_renoise_shares_initial_noise_and_varies_pivot_renoise_only():
    p = plan()
    group = p.fork_renoise(pivot=1, group_size=4)
    assert group.exploration == "renoise" and group.deltas is None
    branches = [group.branch(i) for i in range(4)]
    for b in branches:
        assert torch.equal(b.initial, p.initial)
        for c in (0, 2, 3):
            assert torch.equal(b.renoise[c], p.renoise[c])
    assert all(not torch.equal(branches[0].renoise[1], b.renoise[1]) for b in branches[1:])
    assert torch.equal(p.fork_renoise(1, 4).pivot_renoise, group.pivot_renoise)


def test_group_views_broadcast_shared_draws():
    group = plan().fork(1, 3, 0.5)
    assert group.initial_noise(0).shape[0] == 1 and group.initial_noise(1).shape[0] == 3
    assert group.renoise_draw(2, 0).shape[0] == 1 and group.renoise_draw(1, 0).shape[0] == 3


@pytest.mark.parametrize("pivot,g,sigma,match", [(4, 2, 0.5, "pivot"), (-1, 2, 0.5, "pivot"), (0, 0, 0.5, "group_size"), (0, 2, 1.5, "sigma")])
def test_bad_fork_arguments(pivot, g, sigma, match):
    with pytest.raises(ValueError, match=match):
        plan().fork(pivot, g, sigma)
