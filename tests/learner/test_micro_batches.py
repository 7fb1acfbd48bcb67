"""Micro-batched pivot replay: the accumulated gradient of AR-CoPO and SDE-GRPO equals the single
forward's (`copo_group_loss` / `sde_grpo_group_loss`, backward once), loss and statistics included;
activation checkpointing on and off give the same gradient and save fewer activations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from policy.settings import PolicySettings
from learner.objectives.copo import copo_group_backward, copo_group_loss
from learner.objectives.sde_grpo import sde_grpo_group_backward, sde_grpo_group_loss
from policy.factory import build_configured_policy
from policy.lora import attach_adapter, export_adapter_state, import_adapter_state
from pocket import domain
from pocket.preset import new_transformer, policy_from_transformer
from reward_service.result import RewardResult
from rollout_workers.produce import produce_group
from rollout_workers.tasks import RolloutTask

HEADS = ("VQ", "MQ", "TA")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _score(seed: int):
    rng = np.random.default_rng(seed)
    return lambda videos, prompts: [RewardResult({h: float(rng.normal()) for h in HEADS}, True) for _ in videos]


@pytest.fixture(scope="module")
def setup():
    """A pocket policy with a random (trained-looking) adapter, and two groups it did not generate (G = 4,
    pivot 1): one forking the initial noise, one forking the re-noise draws (SDE-GRPO)."""
    base = policy_from_transformer(new_transformer(0))
    groups = {}
    for exploration in ("initial_noise", "renoise"):
        task = RolloutTask(group_id=exploration, prompt=domain.train_prompts()[0], noise_seed=3, pivot=1, group_size=4,
                           sigma=0.5, exploration=exploration, adapter_name="on_policy")
        groups[exploration] = produce_group(base, task, 0, _score(1), HEADS).group
    policy = copy.deepcopy(base)
    attach_adapter(policy.transformer, "on_policy", rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    import_adapter_state(policy.transformer, "on_policy", {
        k: torch.randn(v.shape, generator=g) * 0.05 for k, v in export_adapter_state(policy.transformer, "on_policy").items()
    })
    return policy, groups


def _grads(policy, run) -> tuple[torch.Tensor, object, dict[str, torch.Tensor]]:
    model = policy.transformer
    model.zero_grad(set_to_none=True)
    out = run()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same_gradient(full: dict, micro: dict) -> None:
    assert full.keys() == micro.keys()
    scale = max(g.abs().max() for g in full.values())
    assert scale > 0
    for name in full:
        torch.testing.assert_close(micro[name], full[name], rtol=1e-4, atol=1e-6 * float(scale), msg=name)


ADV = torch.tensor([1.0, -0.5, 0.25, -0.75])


@pytest.mark.parametrize("tau,clip_eps", [("auto", 0.2), (0.05, None)])
@pytest.mark.parametrize("micro", [1, 3, 5])
def test_copo_micro_batches_add_up_to_the_full_batch_gradient(setup, micro, tau, clip_eps):
    policy, groups = setup
    group, anchors = groups["initial_noise"], torch.tensor([0, 2, 3])

    def single():
        out = copo_group_loss(policy, group, ADV, anchors, tau, clip_eps)
        out.loss.backward()
        return out

    full, full_grads = _grads(policy, single)
    out, grads = _grads(policy, lambda: copo_group_backward(policy, group, ADV, anchors, tau, clip_eps, micro))
    _assert_same_gradient(full_grads, grads)
    assert float(out.loss) == pytest.approx(float(full.loss), abs=1e-7)  # float32 sums of terms of size |A|
    assert out.clip_fraction == pytest.approx(full.clip_fraction, abs=1e-9)
    assert out.ratio_deviation == pytest.approx(full.ratio_deviation, rel=1e-3)  # a max over float32 replays
    assert full.ratio_deviation > 1e-3  # the adapter moved the policy: the ratios are not all one


@pytest.mark.parametrize("eta", [1.0, 0.7])
@pytest.mark.parametrize("micro", [1, 4])
def test_sde_grpo_micro_batches_add_up_to_the_full_batch_gradient(setup, micro, eta):
    policy, groups = setup
    group, branches = groups["renoise"], torch.tensor([0, 1, 3])

    def single():
        out = sde_grpo_group_loss(policy, group, ADV, branches, 0.5, eta)
        out.loss.backward()
        return out

    full, full_grads = _grads(policy, single)
    out, grads = _grads(policy, lambda: sde_grpo_group_backward(policy, group, ADV, branches, 0.5, eta, micro))
    _assert_same_gradient(full_grads, grads)
    assert float(out.loss) == pytest.approx(float(full.loss), abs=1e-7)  # float32 sums of terms of size |A|
    assert out.clip_fraction == pytest.approx(full.clip_fraction, abs=1e-9)
    assert out.ratio_deviation == pytest.approx(full.ratio_deviation, rel=1e-4, abs=1e-9)


def test_loss_scale_scales_the_gradient_and_none_is_the_single_forward(setup):
    policy, groups = setup
    group, anchors = groups["initial_noise"], torch.tensor([1, 3])
    _, once = _grads(policy, lambda: copo_group_backward(policy, group, ADV, anchors, "auto", 0.2, None))
    _, scaled = _grads(policy, lambda: copo_group_backward(policy, group, ADV, anchors, "auto", 0.2, 2, loss_scale=0.25))
    _assert_same_gradient({n: g * 0.25 for n, g in once.items()}, scaled)
    with pytest.raises(ValueError, match="micro_batch_size"):
        copo_group_backward(policy, group, ADV, anchors, "auto", 0.2, 0)


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for the backward while `run` builds its graph."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


def test_activation_checkpointing_gives_the_same_gradient_and_saves_less(setup):
    policy, groups = setup
    policy = copy.deepcopy(policy)
    group, anchors = groups["initial_noise"], torch.tensor([0, 2, 3])
    model = policy.transformer

    def grads_and_saved():
        model.zero_grad(set_to_none=True)
        loss, saved = _saved_bytes(lambda: copo_group_loss(policy, group, ADV, anchors, "auto", 0.2).loss)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, saved

    plain, plain_saved = grads_and_saved()
    model.enable_gradient_checkpointing()
    try:
        checkpointed, checkpointed_saved = grads_and_saved()
    finally:
        model.disable_gradient_checkpointing()
    _assert_same_gradient(plain, checkpointed)
    assert checkpointed_saved < 0.5 * plain_saved


def test_the_config_switch_turns_checkpointing_on_for_the_learner():
    assert build_configured_policy(PolicySettings(activation_checkpointing=True)).transformer.gradient_checkpointing
    assert not build_configured_policy(PolicySettings()).transformer.gradient_checkpointing
