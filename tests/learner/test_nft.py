"""Astrolabe NFT objective, EMA and regularisation controllers (learner/objectives/nft/loss.py) against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.objectives.nft.loss import (
    NFT_TIMESTEPS,
    DynamicReferenceController,
    SelectiveRegController,
    ema_decay,
    ema_update_,
    nft_forward_noise,
    nft_loss,
    nft_reward_weight,
    reward_disagreement,
    select_uncertain,
    selective_reg_loss,
)


def test_reward_weight_matches_numpy():
    adv = np.array([-9.0, -5.0, -2.5, 0.0, 1.0, 5.0, 12.0])
    expected = np.clip((np.clip(adv, -5, 5) / 5) / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(nft_reward_weight(torch.tensor(adv)).numpy(), expected, rtol=1e-15)
    np.testing.assert_allclose(nft_reward_weight(torch.tensor(adv), adv_clip=2.0).numpy(), np.clip(adv / 4 + 0.5, 0, 1))


def test_forward_noise_matches_numpy_for_scalar_and_per_sample_t():
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 3, 2, 4))
    t = np.array([1000.0, 750.0, 250.0])
    expected = (1 - t[:, None, None] / 1000) * x0 + (t[:, None, None] / 1000) * noise
    np.testing.assert_allclose(nft_forward_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy(), expected)
    out = nft_forward_noise(torch.tensor(x0), torch.tensor(noise), 500)
    np.testing.assert_allclose(out.numpy(), 0.5 * x0 + 0.5 * noise)
    assert NFT_TIMESTEPS == (1000, 750, 500, 250)
    with pytest.raises(ValueError, match="1000"):
        nft_forward_noise(torch.tensor(x0), torch.tensor(noise), 1500.0)
    with pytest.raises(ValueError, match=r"\[B\]"):
        nft_forward_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor([10.0, 20.0]))


# ---------------------------------------------------------------- the NFT loss
def np_nft(theta, old, base, target, r, beta, kl_beta, normalize):
    pos = beta * theta + (1 - beta) * old
    neg = (1 + beta) * old - beta * theta
    axes = tuple(range(1, theta.ndim))
    e_pos, e_neg = ((pos - target) ** 2).mean(axis=axes), ((neg - target) ** 2).mean(axis=axes)
    s_pos = np.maximum(np.abs(pos - target).mean(axis=axes), 1e-5) if normalize else np.ones(len(r))
    s_neg = np.maximum(np.abs(neg - target).mean(axis=axes), 1e-5) if normalize else np.ones(len(r))
    div = beta if normalize else 1.0
    policy = np.mean((r * e_pos / s_pos + (1 - r) * e_neg / s_neg) / div)
    loss = policy + kl_beta * np.mean((theta - base) ** 2)

    # Gradient by hand, the normalising scales held constant (they are detached).
    n, b = theta[0].size, len(r)
    shape = (-1,) + (1,) * (theta.ndim - 1)
    grad = (
        (r / s_pos).reshape(shape) * 2 * beta * (pos - target)
        - ((1 - r) / s_neg).reshape(shape) * 2 * beta * (neg - target)
    ) / (n * b * div) + kl_beta * 2 * (theta - base) / theta.size
    return loss, policy, e_pos, e_neg, grad


def nft_case(seed, batch=3, shape=(2, 3, 4)):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(batch, *shape))
    old = target + 0.3 * rng.normal(size=(batch, *shape))
    theta = old + 0.1 * rng.normal(size=(batch, *shape))
    base = old + 0.2 * rng.normal(size=(batch, *shape))
    r = rng.uniform(0, 1, size=batch)
    return theta, old, base, target, r


@pytest.mark.parametrize("normalize", [False, True])
def test_nft_loss_matches_numpy_values_and_gradients(normalize):
    theta, old, base, target, r = nft_case(1)
    beta, kl_beta = 0.1, 0.05
    loss_ref, policy_ref, e_pos, e_neg, grad_ref = np_nft(theta, old, base, target, r, beta, kl_beta, normalize)
    x_theta = torch.tensor(theta, requires_grad=True)
    loss, stats = nft_loss(x_theta, *(torch.tensor(a) for a in (old, base, target, r)), beta, kl_beta, normalize)
    loss.backward()
    assert loss.item() == pytest.approx(loss_ref, rel=1e-12)
    assert stats.policy_loss.item() == pytest.approx(policy_ref, rel=1e-12)
    assert stats.kl_loss.item() == pytest.approx(np.mean((theta - base) ** 2), rel=1e-12)
    assert stats.old_deviation.item() == pytest.approx(np.mean((theta - old) ** 2), rel=1e-12)
    if not normalize:
        assert stats.loss_pos.item() == pytest.approx(e_pos.mean(), rel=1e-12)
        assert stats.loss_neg.item() == pytest.approx(e_neg.mean(), rel=1e-12)
    np.testing.assert_allclose(x_theta.grad.numpy(), grad_ref, rtol=1e-9, atol=1e-14)


def test_nft_loss_gradient_matches_finite_differences():
    theta, old, base, target, r = nft_case(2, batch=2, shape=(3, 2))
    h, grad = 1e-6, np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        e = np.zeros_like(theta)
        e[idx] = h
        plus = np_nft(theta + e, old, base, target, r, 0.1, 1e-2, False)[0]
        minus = np_nft(theta - e, old, base, target, r, 0.1, 1e-2, False)[0]
        grad[idx] = (plus - minus) / (2 * h)
    x_theta = torch.tensor(theta, requires_grad=True)
    nft_loss(x_theta, *(torch.tensor(a) for a in (old, base, target, r)), 0.1, 1e-2)[0].backward()
    np.testing.assert_allclose(x_theta.grad.numpy(), grad, rtol=1e-6, atol=1e-10)


def test_positive_samples_attract_and_negative_samples_repel():
    _, old, _, target, _ = nft_case(3)
    distances = {}
    for r_value in (1.0, 0.0):
        x_theta = torch.tensor(old, requires_grad=True)
        r = torch.full((3,), r_value, dtype=torch.float64)
        nft_loss(x_theta, torch.tensor(old), None, torch.tensor(target), r, 0.1, 0.0)[0].backward()
        stepped = x_theta.detach() - 1.0 * x_theta.grad
        distances[r_value] = (stepped - torch.tensor(target)).square().mean().item()
    start = np.mean((old - target) ** 2)
    assert distances[1.0] < start - 1e-4  # a well-rewarded endpoint pulls the prediction towards it
    assert distances[0.0] > start + 1e-4  # a badly rewarded one pushes it away


def test_x0_space_mixing_equals_velocity_space_mixing():
    # DiffusionNFT mixes velocities; with x0 = x_t - sigma v the same mixture holds for x0 predictions.
    rng = np.random.default_rng(4)
    x_t, v, v_old = rng.normal(size=(3, 2, 5))
    sigma, beta = 0.75, 0.1
    x0, x0_old = x_t - sigma * v, x_t - sigma * v_old
    np.testing.assert_allclose(beta * x0 + (1 - beta) * x0_old, x_t - sigma * (beta * v + (1 - beta) * v_old))
    np.testing.assert_allclose((1 + beta) * x0_old - beta * x0, x_t - sigma * ((1 + beta) * v_old - beta * v))


def test_nft_loss_rejects_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="x0_base"):
        nft_loss(x, x, None, x, torch.zeros(2), 0.1, 1e-4)
    with pytest.raises(ValueError, match="r must"):
        nft_loss(x, x, x, x, torch.zeros(3), 0.1, 1e-4)


# ---------------------------------------------------------------- EMA old adapter
def test_ema_decay_schedule():
    assert [ema_decay(s) for s in (0, 1, 100, 499, 500, 10_000)] == pytest.approx([0.0, 0.001, 0.1, 0.499, 0.5, 0.5])
    with pytest.raises(ValueError):
        ema_decay(-1)


def test_ema_update_in_place_matches_numpy():
    rng = np.random.default_rng(5)
    old_np = {"a.lora_A": rng.normal(size=(4, 3)), "a.lora_B": rng.normal(size=(3, 4))}
    new_np = {k: rng.normal(size=v.shape) for k, v in old_np.items()}
    old = {k: torch.tensor(v) for k, v in old_np.items()}
    new = {k: torch.tensor(v, requires_grad=True) for k, v in new_np.items()}
    storage = {k: v.data_ptr() for k, v in old.items()}
    ema_update_(old, new, 0.3)
    for k in old:
        np.testing.assert_allclose(old[k].numpy(), 0.3 * old_np[k] + 0.7 * new_np[k], rtol=1e-15)
        assert old[k].data_ptr() == storage[k] and not old[k].requires_grad
    with pytest.raises(KeyError, match="a.lora_B"):
        ema_update_(old, {"a.lora_A": new["a.lora_A"]}, 0.3)


# ---------------------------------------------------------------- selective regularisation
def np_average_ranks(x):
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # positions i..j, 1-based, averaged
        i = j + 1
    return ranks


def test_reward_disagreement_matches_numpy_with_ties():
    main = np.array([0.9, 0.1, 0.5, 0.5, 0.3, 0.7])
    aux = np.array([[0.2, 0.8, 0.5, 0.4, 0.4, 0.9], [1.0, 2.0, 3.0, 3.0, 0.0, 1.0]])
    expected = np_average_ranks(main) - np.mean([np_average_ranks(a) for a in aux], axis=0)
    gap = reward_disagreement(torch.tensor(main), torch.tensor(aux))
    np.testing.assert_allclose(gap.numpy(), expected, rtol=1e-15)
    assert gap[0] > 2  # best under the main reward, mid-to-low under the others: suspected hacking
    assert abs(gap.sum().item()) < 1e-12  # rank sums match, so the gaps always sum to zero
    with pytest.raises(ValueError, match="aux_rewards"):
        reward_disagreement(torch.tensor(main), torch.tensor(aux[:, :3]))
    with pytest.raises(ValueError, match="NaN"):
        reward_disagreement(torch.tensor([np.nan, 1.0]), torch.tensor([[0.0, 1.0]]))


def test_select_uncertain_takes_the_top_positive_fraction():
    gap = torch.tensor([2.0, -1.0, 3.5, 0.5, 2.0, -4.0, 0.0, 1.0, -2.0, -1.0])
    np.testing.assert_array_equal(select_uncertain(gap, 0.2).numpy(), np.isin(np.arange(10), [0, 2]))
    np.testing.assert_array_equal(select_uncertain(gap, 0.3).numpy(), np.isin(np.arange(10), [0, 2, 4]))
    np.testing.assert_array_equal(select_uncertain(gap, 0.25).numpy(), np.isin(np.arange(10), [0, 2, 4]))  # ceil
    # Only strictly positive gaps qualify, however large the fraction.
    np.testing.assert_array_equal(select_uncertain(gap, 1.0).numpy(), gap.numpy() > 0)
    assert not select_uncertain(gap, 0.0).any()


def test_selective_reg_loss_matches_numpy_and_is_zero_without_selection():
    rng = np.random.default_rng(6)
    theta, ref = rng.normal(size=(2, 4, 3, 2))
    mask = np.array([True, False, True, False])
    x_theta = torch.tensor(theta, requires_grad=True)
    loss = selective_reg_loss(x_theta, torch.tensor(ref), torch.tensor(mask))
    loss.backward()
    assert loss.item() == pytest.approx(np.mean([np.mean((theta[b] - ref[b]) ** 2) for b in (0, 2)]), rel=1e-12)
    expected_grad = np.where(mask[:, None, None], 2 * (theta - ref) / (2 * 6), 0.0)
    np.testing.assert_allclose(x_theta.grad.numpy(), expected_grad, rtol=1e-12)
    x_theta.grad = None
    none = selective_reg_loss(x_theta, torch.tensor(ref), torch.zeros(4, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.count_nonzero(x_theta.grad) == 0


def test_selective_reg_controller_step_by_step():
    ctrl = SelectiveRegController(window=3)
    # Each update's m is the mean of the non-negative gaps.
    steps = [
        ([1.0, 3.0, -4.0], 2.0, 0.1),  # first update: beta_sel = initial
        ([4.0, -4.0], 4.0, 0.11),  # above the range [2, 2]: x1.1
        ([3.0, -3.0], 3.0, 0.11),  # inside [2, 4]: unchanged
        ([1.0, -1.0], 1.0, 0.099),  # below [2, 4]: x0.9
        ([2.5, -2.5], 2.5, 0.099),  # inside [1, 4] (the last 3 values: 4, 3, 1)
        ([3.5, -3.5], 3.5, 0.1089),  # above [1, 3] (4 has left the window): x1.1
    ]
    for gap, m, beta in steps:
        assert ctrl.update(torch.tensor(gap)) == pytest.approx(beta, rel=1e-12)
        assert ctrl.history[-1] == pytest.approx(m)
    assert ctrl.history == pytest.approx([1.0, 2.5, 3.5])
    restored = SelectiveRegController(window=3)
    restored.load_state_dict(ctrl.state_dict())
    assert restored.update(torch.tensor([9.0])) == ctrl.update(torch.tensor([9.0]))


def test_selective_reg_controller_stays_within_bounds():
    ctrl = SelectiveRegController()
    ctrl.update(torch.tensor([-1.0, -2.0]))
    assert ctrl.history == [0.0]  # no non-negative gap: m = 0
    for k in range(40):
        ctrl.update(torch.tensor([float(k + 1)]))  # ever larger disagreement
    assert ctrl.beta_sel == pytest.approx(0.2)
    for k in range(60):
        ctrl.update(torch.tensor([1.0 / (k + 2), -5.0]))  # ever smaller: below the recent range each time
    assert ctrl.beta_sel == pytest.approx(0.02)


def test_dynamic_reference_controller_step_by_step():
    ctrl = DynamicReferenceController()
    assert ctrl.kl_threshold == 0.15
    assert not ctrl.should_copy(0.9, 0)  # nothing is copied at the first epoch
    assert not ctrl.should_copy(0.15, 1)  # strictly above the threshold is needed
    assert ctrl.should_copy(0.2, 2)  # KL above 0.15; a quick copy, but the threshold is at its top
    assert ctrl.kl_threshold == pytest.approx(0.15) and ctrl.last_copy_epoch == 2
    assert not any(ctrl.should_copy(0.01, e) for e in range(3, 18))  # 15 epochs since: not yet stale
    assert ctrl.should_copy(0.01, 18)  # 16 > 15 epochs without a copy: tighten
    assert ctrl.kl_threshold == pytest.approx(0.14)
    assert not ctrl.should_copy(0.13, 19)
    assert ctrl.should_copy(0.3, 24)  # 6 epochs after: neither quick nor stale, threshold unchanged
    assert ctrl.kl_threshold == pytest.approx(0.14)
    assert ctrl.should_copy(0.145, 25)  # above the lowered threshold, 1 epoch after: loosen
    assert ctrl.kl_threshold == pytest.approx(0.15)
    restored = DynamicReferenceController()
    restored.load_state_dict(ctrl.state_dict())
    assert restored.state_dict() == ctrl.state_dict()
    epoch = 25
    for _ in range(20):  # only staleness copies: the threshold walks down to its floor
        epoch += 16
        assert ctrl.should_copy(None, epoch)
    assert ctrl.kl_threshold == pytest.approx(0.05)
    with pytest.raises(ValueError, match="epoch"):
        ctrl.should_copy(0.0, 3)
