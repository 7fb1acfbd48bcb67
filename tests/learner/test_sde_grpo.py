"""SDE-GRPO log-probabilities and loss (learner/objectives/sde_grpo.py) against float64 NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner.objectives.sde_grpo import sde_grpo_loss, sde_grpo_loss_with_stats, sde_step_log_prob, sde_step_mean_std


def np_step_mean_std(x_t, x0, sigma, sigma_next, eta):
    sigma = np.reshape(sigma, (-1,) + (1,) * (x_t.ndim - 1))
    sigma_next = np.reshape(sigma_next, (-1,) + (1,) * (x_t.ndim - 1))
    eps_hat = (x_t - (1 - sigma) * x0) / sigma
    return (1 - sigma_next) * x0 + sigma_next * np.sqrt(1 - eta**2) * eps_hat, sigma_next * eta


def np_log_prob(x_next, x_t, x0, sigma, sigma_next, eta):
    mu, std = np_step_mean_std(x_t, x0, sigma, sigma_next, eta)
    z = (x_next - mu) / std
    dens = np.exp(-0.5 * z**2) / (std * np.sqrt(2 * np.pi))
    return np.log(dens).reshape(len(x_t), -1).mean(axis=1)


def np_log_prob_grad_x0(x_next, x_t, x0, sigma, sigma_next, eta):
    """d mean_e log N / d x0, by hand: residual / std^2 times d mu / d x0, over the element count."""
    mu, std = np_step_mean_std(x_t, x0, sigma, sigma_next, eta)
    s = np.reshape(sigma, (-1,) + (1,) * (x_t.ndim - 1))
    sn = np.reshape(sigma_next, (-1,) + (1,) * (x_t.ndim - 1))
    dmu_dx0 = (1 - sn) - sn * np.sqrt(1 - eta**2) * (1 - s) / s
    n = x_t[0].size
    return (x_next - mu) / std**2 * dmu_dx0 / n


def random_step(seed, batch=3, shape=(2, 3, 4)):
    rng = np.random.default_rng(seed)
    x_t = rng.normal(size=(batch, *shape))
    x0 = rng.normal(size=(batch, *shape))
    sigma = rng.uniform(0.6, 1.0, size=batch)
    sigma_next = sigma * rng.uniform(0.3, 0.9, size=batch)
    # x_next near the step's distribution (eta 0.3, a wider spread), so densities stay representable.
    mu, std = np_step_mean_std(x_t, x0, sigma, sigma_next, 0.3)
    x_next = mu + 1.5 * std * rng.normal(size=(batch, *shape))
    return x_next, x_t, x0, sigma, sigma_next


def test_step_log_prob_matches_numpy_values_and_gradients():
    x_next, x_t, x0, sigma, sigma_next = random_step(0)
    eta = 0.3
    x0_t = torch.tensor(x0, requires_grad=True)
    logp = sde_step_log_prob(torch.tensor(x_next), torch.tensor(x_t), x0_t, torch.tensor(sigma), torch.tensor(sigma_next), eta)
    assert logp.shape == (3,)
    np.testing.assert_allclose(logp.detach().numpy(), np_log_prob(x_next, x_t, x0, sigma, sigma_next, eta), rtol=1e-12)
    logp.sum().backward()
    np.testing.assert_allclose(
        x0_t.grad.numpy(), np_log_prob_grad_x0(x_next, x_t, x0, sigma, sigma_next, eta), rtol=1e-10, atol=1e-14
    )


def test_step_log_prob_of_a_sampler_step_is_the_standard_normal_density_of_its_noise():
    # Draw x' exactly as the sampler does; its log-prob must be log phi(eps') - log(sigma' eta), averaged.
    rng = np.random.default_rng(1)
    x_t, x0, eps = rng.normal(size=(3, 2, 4, 5))
    sigma, sigma_next, eta = 0.9375, 0.8333, 0.7
    eps_hat = (x_t - (1 - sigma) * x0) / sigma
    x_next = (1 - sigma_next) * x0 + sigma_next * (math.sqrt(1 - eta**2) * eps_hat + eta * eps)
    expected = (-0.5 * eps**2 - 0.5 * math.log(2 * math.pi) - math.log(sigma_next * eta)).reshape(2, -1).mean(axis=1)
    logp = sde_step_log_prob(*(torch.tensor(a) for a in (x_next, x_t, x0)), sigma, sigma_next, eta)
    np.testing.assert_allclose(logp.numpy(), expected, rtol=1e-10)


def test_eta_one_reduces_the_mean_to_the_consistency_sampler():
    _, x_t, x0, _, _ = random_step(2)
    mean, std = sde_step_mean_std(torch.tensor(x_t), torch.tensor(x0), 0.8, 0.5, eta=1.0)
    np.testing.assert_allclose(mean.numpy(), 0.5 * x0, rtol=0, atol=1e-15)
    assert std.item() == pytest.approx(0.5)


def test_step_log_prob_float32_close_to_numpy():
    x_next, x_t, x0, sigma, sigma_next = random_step(3, shape=(3, 4, 8, 8))
    args = [torch.tensor(a, dtype=torch.float32) for a in (x_next, x_t, x0, sigma, sigma_next)]
    logp = sde_step_log_prob(*args, 0.3)
    assert logp.dtype == torch.float32
    np.testing.assert_allclose(logp.numpy(), np_log_prob(x_next, x_t, x0, sigma, sigma_next, 0.3), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma_next=0.0), "deterministic"),
        (dict(eta=0.0), "eta"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=torch.ones(5)), "sigma"),
    ],
)
def test_step_log_prob_rejects_bad_input(kwargs, message):
    x = torch.zeros(3, 2)
    args = dict(x_next=x, x_t=x, x0_pred=x, sigma=0.9, sigma_next=0.5, eta=0.3) | kwargs
    with pytest.raises(ValueError, match=message):
        sde_step_log_prob(**args)


# ---------------------------------------------------------------- the clipped loss
def np_loss(logp, logp_old, adv, clip, adv_clip):
    a = np.clip(adv, -adv_clip, adv_clip)
    ratio = np.exp(logp - logp_old)
    return np.mean([max(-a[k] * ratio[k], -a[k] * min(max(ratio[k], 1 - clip), 1 + clip)) for k in range(len(a))])


def test_loss_matches_numpy_values_and_gradients():
    rng = np.random.default_rng(4)
    logp_old = rng.normal(size=8)
    logp = logp_old + rng.normal(scale=0.05, size=8)
    adv = rng.normal(scale=3.0, size=8)
    adv[0] = 9.0  # beyond adv_clip
    clip = 0.03
    ratio = np.exp(logp - logp_old)
    assert np.any(np.abs(ratio - 1) > clip) and np.any(np.abs(ratio - 1) < clip)
    assert np.abs(np.abs(ratio - 1) - clip).min() > 1e-5  # no kink within the finite-difference step

    lp = torch.tensor(logp, requires_grad=True)
    stats = sde_grpo_loss_with_stats(lp, torch.tensor(logp_old), torch.tensor(adv), clip)
    stats.loss.backward()
    assert stats.loss.item() == pytest.approx(np_loss(logp, logp_old, adv, clip, 5.0), rel=1e-12)
    h = 1e-7
    fd = np.array(
        [
            (np_loss(logp + h * e, logp_old, adv, clip, 5.0) - np_loss(logp - h * e, logp_old, adv, clip, 5.0)) / (2 * h)
            for e in np.eye(8)
        ]
    )
    np.testing.assert_allclose(lp.grad.numpy(), fd, rtol=1e-6, atol=1e-10)
    assert stats.clip_fraction.item() == pytest.approx(np.mean(np.abs(ratio - 1) > clip))
    assert stats.approx_kl.item() == pytest.approx(0.5 * np.mean((logp - logp_old) ** 2), rel=1e-12)
    assert stats.ratio_mean.item() == pytest.approx(ratio.mean(), rel=1e-12)


def test_ratio_one_when_log_probs_equal():
    logp = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 7.0], dtype=torch.float64)
    stats = sde_grpo_loss_with_stats(logp, logp.detach().clone(), adv, clip_eps=1e-4)
    assert stats.ratio_mean.item() == 1.0 and stats.clip_fraction.item() == 0.0 and stats.approx_kl.item() == 0.0
    assert stats.loss.item() == pytest.approx(-(1.0 - 2.0 + 5.0) / 3)  # A clamped to 5
    stats.loss.backward()
    np.testing.assert_allclose(logp.grad.numpy(), -np.array([1.0, -2.0, 5.0]) / 3)


def test_a_clipped_ratio_has_zero_gradient():
    logp_old = torch.zeros(4, dtype=torch.float64)
    logp = torch.tensor([0.1, -0.1, 0.1, -0.1], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    sde_grpo_loss(logp, logp_old, adv, clip_eps=0.01).backward()
    # Ratio above the range with A > 0, and below it with A < 0: clipped, no gradient.
    assert logp.grad[0] == 0.0 and logp.grad[1] == 0.0
    # The other two move the policy back towards the trust region: the unclipped branch is active.
    assert logp.grad[2].item() == pytest.approx(math.exp(0.1) / 4)
    assert logp.grad[3].item() == pytest.approx(-math.exp(-0.1) / 4)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="advantages"):
        sde_grpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), 1e-3)
