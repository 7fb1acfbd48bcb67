"""AR-CoPO objective (learner/objectives/copo.py) against an independent float64 NumPy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.objectives.copo import (
    auto_tau,
    copo_loss,
    copo_loss_with_stats,
    sample_anchors,
)


# ---------------------------------------------------------------- independent NumPy reference
def np_copo(theta, old, anchors, adv, tau, clip_eps):
    """Loop-by-loop Eq. 3-4: plain softmax (not log space), ratio as a quotient."""
    batch, group = adv.shape
    per_anchor, clipped_count, rhos, dists = [], 0, [], []
    for b in range(batch):
        d = np.array([np.mean((old[b, i] - theta[b]) ** 2) for i in range(group)])
        d_old = np.array([np.mean((old[b, i] - old[b, anchors[b]]) ** 2) for i in range(group)])
        w = np.exp(-(d - d.min()) / tau)
        w_old = np.exp(-(d_old - d_old.min()) / tau)
        rho = (w / w.sum()) / (w_old / w_old.sum())
        terms = []
        for i in range(group):
            plain = rho[i] * adv[b, i]
            if clip_eps is None:
                terms.append(plain)
                continue
            clipped = min(max(rho[i], 1 - clip_eps), 1 + clip_eps) * adv[b, i]
            terms.append(min(plain, clipped))
            clipped_count += clipped < plain
        per_anchor.append(sum(terms) / group)
        rhos.extend(rho)
        dists.extend(d)
    stats = dict(
        clip_fraction=clipped_count / (batch * group),
        rho_mean=np.mean(rhos),
        rho_max_deviation=np.max(np.abs(np.array(rhos) - 1)),
        distance_mean=np.mean(dists),
        rhos=np.array(rhos),
    )
    return -np.mean(per_anchor), stats


def np_grad_fd(fn, x, h=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (fn(plus) - fn(minus)) / (2 * h)
    return grad


def random_case(seed, batch=3, group=5, sample_shape=(2, 3, 2), spread=0.3):
    rng = np.random.default_rng(seed)
    old = rng.normal(size=(batch, group, *sample_shape))
    anchors = rng.choice(group, size=batch, replace=False) if batch <= group else rng.integers(0, group, batch)
    theta = old[np.arange(batch), anchors] + spread * rng.normal(size=(batch, *sample_shape))
    adv = rng.normal(size=(batch, group))
    return theta, old, anchors, adv


def to_torch(theta, old, anchors, adv, dtype=torch.float64):
    return (
        torch.tensor(theta, dtype=dtype, requires_grad=True),
        torch.tensor(old, dtype=dtype),
        torch.tensor(anchors, dtype=torch.long),
        torch.tensor(adv, dtype=dtype),
    )


# ---------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("clip_eps", [None, 0.05])
def test_copo_loss_matches_numpy_values_and_gradients(clip_eps):
    theta, old, anchors, adv = random_case(0)
    tau = 0.7
    ref_loss, ref_stats = np_copo(theta, old, anchors, adv, tau, clip_eps)
    if clip_eps is not None:
        # Both branches are exercised, and no ratio sits on a kink the finite difference could cross.
        assert 0 < ref_stats["clip_fraction"] < 1
        edges = np.abs(np.abs(ref_stats["rhos"] - 1) - clip_eps)
        assert edges.min() > 1e-4
    ref_grad = np_grad_fd(lambda t: np_copo(t, old, anchors, adv, tau, clip_eps)[0], theta)

    x_theta, x_old, idx, a = to_torch(theta, old, anchors, adv)
    stats = copo_loss_with_stats(x_theta, x_old, idx, a, tau, clip_eps)
    stats.loss.backward()
    assert stats.loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(x_theta.grad.numpy(), ref_grad, rtol=1e-6, atol=1e-9)
    assert np.abs(ref_grad).max() > 1e-3  # the comparison is not between two zeros
    for name in ("clip_fraction", "rho_mean", "rho_max_deviation", "distance_mean"):
        assert getattr(stats, name).item() == pytest.approx(ref_stats[name], rel=1e-9, abs=1e-12), name


def test_copo_loss_float32_matches_numpy():
    theta, old, anchors, adv = random_case(1, batch=4, group=12, sample_shape=(3, 4, 4, 4))
    ref_loss, _ = np_copo(theta, old, anchors, adv, 0.5, 0.01)
    x_theta, x_old, idx, a = to_torch(theta, old, anchors, adv, dtype=torch.float32)
    loss = copo_loss(x_theta, x_old, idx, a, 0.5, 0.01)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)


def test_clip_none_is_the_unclipped_formula():
    theta, old, anchors, adv = random_case(2)
    _, ref_stats = np_copo(theta, old, anchors, adv, 0.4, None)
    unclipped = -np.mean((ref_stats["rhos"].reshape(adv.shape) * adv).mean(axis=1))
    x_theta, x_old, idx, a = to_torch(theta, old, anchors, adv)
    no_clip = copo_loss(x_theta, x_old, idx, a, 0.4, None)
    huge_clip = copo_loss(x_theta, x_old, idx, a, 0.4, 1e9)
    small_clip = copo_loss(x_theta, x_old, idx, a, 0.4, 1e-4)
    assert no_clip.item() == pytest.approx(unclipped, rel=1e-12)
    assert huge_clip.item() == pytest.approx(no_clip.item(), rel=1e-12)
    assert small_clip.item() != pytest.approx(no_clip.item(), rel=1e-3)


def test_rho_is_one_when_current_equals_old_anchor_prediction():
    _, old, anchors, adv = random_case(3)
    theta = old[np.arange(len(anchors)), anchors]
    x_theta, x_old, idx, a = to_torch(theta, old, anchors, adv)
    stats = copo_loss_with_stats(x_theta, x_old, idx, a, 0.3, 1e-4)
    assert stats.rho_max_deviation.item() < 1e-12
    assert stats.rho_mean.item() == pytest.approx(1.0, abs=1e-12)
    assert stats.clip_fraction.item() == 0.0
    assert stats.loss.item() == pytest.approx(-adv.mean(), abs=1e-12)


# ---------------------------------------------------------------- behaviour
def test_gradient_step_pulls_towards_positive_and_pushes_from_negative_candidates():
    rng = np.random.default_rng(4)
    group, shape = 6, (3, 8, 8)
    old = rng.normal(size=(1, group, *shape))
    anchors = np.array([0])
    adv = np.array([[0.0, 1.5, -1.5, 0.0, 0.0, 0.0]])
    x_theta, x_old, idx, a = to_torch(old[:, 0].copy(), old, anchors, adv)

    def distances(x):
        return ((x_old[0] - x.detach()[0]).square().mean(dim=(1, 2, 3))).numpy()

    before = distances(x_theta)
    loss = copo_loss(x_theta, x_old, idx, a, tau=float(before[1:].mean()), clip_eps=1e-4)
    loss.backward()
    stepped = x_theta.detach() - 0.5 * x_theta.grad / x_theta.grad.abs().max()
    after = distances(stepped)
    assert after[1] < before[1] - 1e-3  # closer to the positive candidate
    assert after[2] > before[2] + 1e-3  # farther from the negative one


def test_zero_advantages_give_zero_loss_and_zero_gradient():
    theta, old, anchors, _ = random_case(5)
    x_theta, x_old, idx, a = to_torch(theta, old, anchors, np.zeros((3, 5)))
    for clip_eps in (None, 1e-4):
        x_theta.grad = None
        loss = copo_loss(x_theta, x_old, idx, a, 0.5, clip_eps)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.count_nonzero(x_theta.grad) == 0


def test_a_ratio_outside_the_clip_range_gives_that_term_zero_gradient():
    # Candidate 1 sits close to the anchor's current prediction, so pi_theta(1) grew: rho_1 > 1 + eps.
    old = np.zeros((1, 3, 4))
    old[0, 1] = [1.0, 0.0, 0.0, 0.0]
    old[0, 2] = [0.0, -1.0, 0.5, 0.0]
    theta = np.array([[0.6, 0.0, 0.0, 0.1]])
    anchors, tau, eps = np.array([0]), 0.5, 0.1
    _, ref = np_copo(theta, old, anchors, np.zeros((1, 3)), tau, eps)
    assert ref["rhos"][1] > 1 + eps and ref["rhos"][2] < 1 - eps

    def grad(adv):
        x_theta, x_old, idx, a = to_torch(theta, old, anchors, np.array([adv]))
        copo_loss(x_theta, x_old, idx, a, tau, eps).backward()
        return x_theta.grad

    assert torch.count_nonzero(grad([0.0, 1.0, 0.0])) == 0  # A > 0, rho above the range: clipped
    assert torch.count_nonzero(grad([0.0, 0.0, -1.0])) == 0  # A < 0, rho below the range: clipped
    assert grad([0.0, -1.0, 0.0]).abs().max() > 1e-2  # A < 0, rho above: the unclipped branch is the min
    assert grad([0.0, 0.0, 1.0]).abs().max() > 1e-2
    # The clipped term adds nothing to a mixed gradient.
    np.testing.assert_allclose(grad([0.0, 1.0, 0.7]).numpy(), grad([0.0, 0.0, 0.7]).numpy(), rtol=0, atol=1e-15)


def test_folding_the_t_steps_into_the_batch_averages_the_per_step_losses():
    steps = [random_case(10 + t, batch=2) for t in range(4)]
    per_step = [copo_loss(*to_torch(*case), 0.5, 0.05) for case in steps]
    folded = to_torch(*(np.concatenate([c[k] for c in steps]) for k in range(4)))
    assert copo_loss(*folded, 0.5, 0.05).item() == pytest.approx(torch.stack(per_step).mean().item(), rel=1e-12)


# ---------------------------------------------------------------- temperature
def test_auto_tau_is_the_median_off_anchor_distance():
    theta, old, anchors, adv = random_case(6, batch=3, group=5)
    expected = np.median(
        [np.mean((old[b, i] - old[b, anchors[b]]) ** 2) for b in range(3) for i in range(5) if i != anchors[b]]
    )
    x_theta, x_old, idx, a = to_torch(theta, old, anchors, adv)
    tau = auto_tau(x_old, idx)
    assert tau.item() == pytest.approx(expected, rel=1e-6)
    assert not tau.requires_grad
    auto = copo_loss(x_theta, x_old, idx, a, "auto", 0.05)
    ref_loss, _ = np_copo(theta, old, anchors, adv, tau.item(), 0.05)
    assert auto.item() == pytest.approx(ref_loss, rel=1e-9)


def test_auto_tau_scales_with_the_latents():
    _, old, anchors, _ = random_case(7)
    x_old, idx = torch.tensor(old), torch.tensor(anchors)
    assert auto_tau(10.0 * x_old, idx).item() == pytest.approx(100.0 * auto_tau(x_old, idx).item(), rel=1e-6)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, o, i, a: (t[:, :1], o, i, a), "x0_theta"),
        (lambda t, o, i, a: (t, o, i.int(), a), "anchor_index"),
        (lambda t, o, i, a: (t, o, i + 10, a), "anchor_index"),
        (lambda t, o, i, a: (t, o, i, a[:, :2]), "advantages"),
    ],
)
def test_bad_shapes_are_named(change, message):
    args = change(*to_torch(*random_case(8)))
    with pytest.raises(ValueError, match=message):
        copo_loss(*args, 0.5, 0.1)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), "median"])
def test_bad_tau_is_rejected(tau):
    with pytest.raises(ValueError, match="tau"):
        copo_loss(*to_torch(*random_case(9)), tau, 0.1)


# ---------------------------------------------------------------- advantages and anchors
def test_sample_anchors_are_distinct_uniform_and_reproducible():
    draws = torch.stack([sample_anchors(12, 4, torch.Generator().manual_seed(s)) for s in range(3000)])
    assert draws.dtype == torch.long and draws.shape == (3000, 4)
    assert all(len(set(row.tolist())) == 4 for row in draws)
    counts = torch.bincount(draws.flatten(), minlength=12).double()
    # Each candidate is an anchor with probability 4/12: 1000 expected, binomial sd ~ 26.
    assert counts.min() > 900 and counts.max() < 1100
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_anchors(12, 4, g1), sample_anchors(12, 4, g2))
    with pytest.raises(ValueError, match="anchors"):
        sample_anchors(3, 4)
