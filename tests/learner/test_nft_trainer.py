"""Astrolabe NFT in the learner: the streaming window against a dense teacher-forced forward, the loss
against an independent float64 computation, gradients, the EMA old adapter, broadcast, selective
regularisation, the dynamic reference, checkpoint/resume, and a short run through the real driver."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from controller.config import CONFIG_DIR, load_config

from learner.settings import AlgorithmSettings

from reward_service.settings import RewardSettings
from learner.learner_actor import Learner
from learner.objectives.nft.loss import DynamicReferenceController
from learner.objectives.nft.objective import OLD_ADAPTER, REFERENCE_ADAPTER, NftObjective, nft_window
from learner.objectives.nft.streaming import AdapterSwitch, NftAdapters, RollingContext, nft_group_update
from policy.lora import PEFT_KEY_PREFIX, attach_adapter, export_adapter_state, import_adapter_state
from pocket import domain
from pocket.preset import new_transformer, policy_from_transformer, save_pocket_weights
from policy.presets import build_policy
from reward_service.result import RewardResult
from rollout_workers.produce import produce_group
from rollout_workers.tasks import RolloutTask

HEADS = ("VQ", "MQ", "TA")
PROMPT = domain.train_prompts()[0]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def pocket_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("pocket_weights")
    save_pocket_weights(new_transformer(0), path, {"note": "untrained, for tests"})
    return path


@pytest.fixture(scope="module")
def pocket():
    """The untrained pocket policy (no adapter) and two recorded groups (pivots 1 and 2, G = 3)."""
    policy = policy_from_transformer(new_transformer(0))
    return policy, {1: _group(policy, pivot=1), 2: _group(policy, pivot=2, seed=2, group_id="g2")}


def _randomise(transformer, name: str, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * scale for k, v in export_adapter_state(transformer, name).items()}
    import_adapter_state(transformer, name, state)
    return state


def _pocket_policy_with(base, adapters: tuple[str, ...]):
    policy = copy.deepcopy(base)
    for i, name in enumerate(adapters):
        attach_adapter(policy.transformer, name, rank=4, alpha=8)
        _randomise(policy.transformer, name, seed=10 + i)
    return policy


def _score(seed: int):
    rng = np.random.default_rng(seed)
    return lambda videos, prompts: [RewardResult({h: float(rng.normal()) for h in HEADS}, True) for _ in videos]


def _group(policy, pivot: int, size: int = 3, seed: int = 1, group_id: str = "g0"):
    task = RolloutTask(group_id=group_id, prompt=PROMPT, noise_seed=seed, pivot=pivot, group_size=size, sigma=0.5,
                       adapter_name="on_policy", record_final_latents=True)
    return produce_group(policy, task, 0, _score(seed), HEADS).group


def _dense_x0(policy, switch, adapter, clean, noisy, t_frames, text):
    """x0 of every noisy chunk of `[clean | noisy]` under the teacher-forcing mask, in float64."""
    with switch.use(adapter), torch.no_grad():
        flow = policy.transformer.forward_dense(noisy, t_frames, text, policy.frames_per_chunk, clean_latents=clean,
                                                local_window=policy.local_window, sink_frames=policy.sink_frames)
    return noisy.double() - (t_frames.double() / 1000)[..., None, None, None] * flow.double()


def _noised(latents, window, f, timesteps, noise):
    noisy, t_frames = latents.clone(), torch.zeros(latents.shape[:2])
    for c, t in zip(window, timesteps):
        s = slice(c * f, (c + 1) * f)
        noisy[:, s] = (1 - t / 1000) * latents[:, s] + t / 1000 * noise[:, s]
        t_frames[:, s] = t
    return noisy, t_frames


@pytest.mark.parametrize("preset", ["tiny-window", "pocket"])
def test_rolling_window_predictions_equal_a_dense_teacher_forced_forward(preset):
    """Each window chunk's x0, predicted on a rolling KV cache of the branch's clean chunks (written
    without grad, evicting under the local window), equals a dense block-causal forward of
    [clean context | noisy chunk], for the trainable adapter, the old adapter and the base."""
    if preset == "pocket":
        policy, text = policy_from_transformer(new_transformer(0)), None
    else:
        policy = build_policy(preset)
        text = torch.randn(1, 6, policy.transformer.config.text_dim, generator=torch.Generator().manual_seed(5))
    for i, name in enumerate(("trained", "old")):
        attach_adapter(policy.transformer, name, rank=4, alpha=8)
        _randomise(policy.transformer, name, seed=i, scale=0.2)
    text = policy.text_conditioning([PROMPT]) if text is None else text
    switch = AdapterSwitch(policy.transformer, "trained")
    f, num_chunks, pivot, batch = policy.frames_per_chunk, policy.num_chunks, 1, 2
    window = range(pivot, num_chunks)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, num_chunks * f, *policy.latent_shape, generator=g)
    latents[1, : pivot * f] = latents[0, : pivot * f]  # branches share the chunks before the pivot
    timesteps = [1000.0, 750.0, 500.0, 250.0, 750.0][: len(window)]
    noisy, t_frames = _noised(latents, window, f, timesteps, torch.randn(latents.shape, generator=g))

    per_adapter = {}
    for adapter in ("trained", "old", None):
        context = RollingContext(policy, text, switch, adapter, latents[0, : pivot * f], batch)
        streamed = []
        for c, t in zip(window, timesteps):
            streamed.append(context.predict(noisy[:, c * f : (c + 1) * f], t))
            context.append(latents[:, c * f : (c + 1) * f])
        if policy.local_window is not None:
            assert context.cache.capacity == policy.local_window < policy.num_frames  # the cache did roll
        dense = _dense_x0(policy, switch, adapter, latents, noisy, t_frames, text)
        for c, x0 in zip(window, streamed):
            torch.testing.assert_close(x0.double(), dense[:, c * f : (c + 1) * f], atol=2e-5, rtol=1e-4)
        per_adapter[adapter] = torch.cat(streamed, dim=1)
    assert (per_adapter["trained"] - per_adapter["old"]).abs().max() > 1e-3  # the adapters do matter
    assert (per_adapter["trained"] - per_adapter[None]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["selective", "base"])
def test_group_update_matches_an_independent_computation_and_trains_only_the_trainable_adapter(mode, pocket):
    policy = _pocket_policy_with(pocket[0], ("trained", "old", "ref"))
    switch = AdapterSwitch(policy.transformer, "trained")
    group = pocket[1][1]
    f, window, beta, kl_beta = policy.frames_per_chunk, range(1, 3), 0.1, 0.5
    branches, r = torch.arange(3), torch.tensor([0.9, 0.2, 0.5])
    selected = torch.tensor([True, False, True])
    g = torch.Generator().manual_seed(3)
    draws = [(t, torch.randn(3, f, *policy.latent_shape, generator=g)) for t in (750.0, 250.0)]
    adapters = NftAdapters("trained", "old", "ref" if mode == "selective" else None)

    before = policy.transformer.sample_forwards
    stats = nft_group_update(policy, group, branches, r, window, draws, adapters, switch, beta, kl_beta,
                             selected=selected if mode == "selective" else None)
    forwards = policy.transformer.sample_forwards - before
    streams = [3, 3, 2 if mode == "selective" else 3]  # theta, old, and the reference on the selected rows only
    assert forwards == sum(group.pivot + 2 * len(window) * b for b in streams)

    # Independent: dense forwards of [clean | noisy] under each model, the NFT formula in float64.
    clean = group.final_latents.float()
    noise = torch.zeros_like(clean)
    for (t, n), c in zip(draws, window):
        noise[:, c * f : (c + 1) * f] = n
    noisy, t_frames = _noised(clean, window, f, [t for t, _ in draws], noise)
    text = policy.text_conditioning([group.prompt])
    x0 = {a: _dense_x0(policy, switch, a, clean, noisy, t_frames, text) for a in ("trained", "old", "ref", None)}
    r64 = r.double()
    for s, c in zip(stats, window):
        part = slice(c * f, (c + 1) * f)
        theta, old, target = x0["trained"][:, part], x0["old"][:, part], clean[:, part].double()
        mse = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)  # noqa: E731
        pos, neg = beta * theta + (1 - beta) * old, (1 + beta) * old - beta * theta
        policy_loss = (r64 * mse(pos, target) + (1 - r64) * mse(neg, target)).mean()
        if mode == "selective":
            reg = mse(theta, x0["ref"][:, part])[selected].mean()
            assert s.reg_loss == pytest.approx(float(reg), rel=1e-3) and s.kl_loss == 0.0
        else:
            reg = ((theta - x0[None][:, part]) ** 2).mean()
            assert s.kl_loss == pytest.approx(float(reg), rel=1e-3) and s.reg_loss == 0.0
        assert s.policy_loss == pytest.approx(float(policy_loss), rel=1e-4)
        assert s.loss == pytest.approx(float(policy_loss + kl_beta * reg), rel=1e-4)

    named = dict(policy.transformer.named_parameters())
    trained = [p for n, p in named.items() if ".trained." in n]
    assert trained and all(p.grad is not None for p in trained)
    assert any(float(p.grad.abs().max()) > 0 for p in trained)
    others = [n for n, p in named.items() if ".trained." not in n and p.grad is not None]
    assert others == []  # old, ref and the base weights get no gradient
    assert all(p.requires_grad == (".trained." in n) for n, p in named.items())  # switching restored the flags


def test_no_selected_sample_means_no_regulariser_and_no_reference_forward(pocket):
    policy = _pocket_policy_with(pocket[0], ("trained", "old", "ref"))
    switch = AdapterSwitch(policy.transformer, "trained")
    group = pocket[1][2]
    f = policy.frames_per_chunk
    draws = [(500.0, torch.randn(3, f, *policy.latent_shape, generator=torch.Generator().manual_seed(0)))]
    before = policy.transformer.sample_forwards
    stats = nft_group_update(policy, group, torch.arange(3), torch.full((3,), 0.5), range(2, 3), draws,
                             NftAdapters("trained", "old", "ref"), switch, 0.1, 1.0, selected=torch.zeros(3, dtype=torch.bool))
    assert policy.transformer.sample_forwards - before == 2 * (2 + 2 * 3)  # theta and old only
    assert stats[0].reg_loss == 0.0 and stats[0].loss == pytest.approx(stats[0].policy_loss)


def test_micro_batches_of_branches_add_up_to_the_full_batch_gradient(pocket):
    """Splitting a group's branches into micro-batches (each weighted by its share of the samples)
    gives the gradient of the whole batch: the NFT and base-KL terms are means over samples."""
    policy = _pocket_policy_with(pocket[0], ("trained", "old"))
    switch = AdapterSwitch(policy.transformer, "trained")
    group, f = pocket[1][2], policy.frames_per_chunk
    noise = torch.randn(3, f, *policy.latent_shape, generator=torch.Generator().manual_seed(4))
    r, adapters = torch.tensor([0.8, 0.1, 0.4]), NftAdapters("trained", "old")
    params = [p for p in policy.transformer.parameters() if p.requires_grad]

    def gradient(parts):
        for p in params:
            p.grad = None
        for rows in parts:
            nft_group_update(policy, group, rows, r[rows], range(2, 3), [(750.0, noise[rows])], adapters, switch,
                             0.1, 0.5, loss_scale=len(rows) / 3)
        return torch.cat([p.grad.flatten() for p in params])

    whole = gradient([torch.arange(3)])
    split = gradient([torch.tensor([0, 1]), torch.tensor([2])])
    assert whole.abs().max() > 0
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-9)


def test_window_starts_at_the_pivot_and_stops_at_the_end(pocket):
    policy, group = pocket[0], pocket[1][2]
    assert nft_window(group, None) == range(2, 4)
    assert nft_window(group, 1) == range(2, 3)
    assert nft_window(group, 5) == range(2, 4)
    without = group.model_copy(update={"final_latents": None})
    with pytest.raises(ValueError, match="record_final_latents"):
        nft_group_update(policy, without, torch.arange(3), torch.ones(3), range(2, 3), [(250.0, torch.zeros(1))],
                         NftAdapters("a", "b"), None, 0.1, 0.0)


def _trainer(policy, **algorithm) -> NftObjective:
    alg = AlgorithmSettings(objective="nft", **algorithm)
    return NftObjective(policy, "trained", alg, RewardSettings(), seed=0)


def test_ema_update_of_the_old_adapter_follows_the_formula_on_real_adapter_tensors(pocket):
    policy = _pocket_policy_with(pocket[0], ("trained",))
    trainer = _trainer(policy)
    t = policy.transformer
    theta = export_adapter_state(t, "trained")
    assert all(torch.equal(export_adapter_state(t, OLD_ADAPTER)[k], v) for k, v in theta.items())  # starts equal
    old = _randomise(t, OLD_ADAPTER, seed=99)
    for steps, decay in ((300, 0.3), (2000, 0.5)):
        trainer.steps = steps
        assert trainer.end_epoch() == pytest.approx(decay)
        expected = {k: decay * old[k].double().numpy() + (1 - decay) * theta[k].double().numpy() for k in old}
        new_old = export_adapter_state(t, OLD_ADAPTER)
        for k in old:
            np.testing.assert_allclose(new_old[k].double().numpy(), expected[k], rtol=1e-6, atol=1e-7)
        assert all(torch.equal(export_adapter_state(t, "trained")[k], v) for k, v in theta.items())
        old = new_old


def test_selection_picks_the_samples_the_main_reward_likes_far_more_than_the_auxiliary_heads(pocket):
    policy = _pocket_policy_with(pocket[0], ("trained",))
    trainer = _trainer(policy, nft_selective_reg=True)
    rewards1 = {"VQ": [0.1, 0.2, 0.3], "MQ": [0.5, 0.1, 0.2], "TA": [0.0, 0.1, 0.2]}
    rewards2 = {"VQ": [9.0, 0.15, 0.25], "MQ": [0.05, 0.6, 0.7], "TA": [0.01, 0.11, 0.21]}
    g1 = pocket[1][1].model_copy(update={"rewards": {h: torch.tensor(v, dtype=torch.float64) for h, v in rewards1.items()}})
    g2 = pocket[1][2].model_copy(update={"rewards": {h: torch.tensor(v, dtype=torch.float64) for h, v in rewards2.items()},
                                         "reward_valid": torch.tensor([True, True, False])})
    masks = trainer.select([(g1, torch.zeros(3)), (g2, torch.zeros(3))])

    # Independent: ranks over the 5 valid samples, main = VQ + MQ + TA, gap = rank_main - mean aux rank.
    cat = {h: np.array(rewards1[h] + rewards2[h][:2]) for h in HEADS}
    rank = lambda x: np.argsort(np.argsort(x)) + 1.0  # noqa: E731  (distinct values)
    gap = rank(sum(cat.values())) - np.mean([rank(cat[h]) for h in HEADS], axis=0)
    keep = int(math.ceil(0.1 * 5))  # beta_sel starts at 0.1
    expected = np.zeros(5, dtype=bool)
    expected[np.argsort(-gap, kind="stable")[:keep]] = True
    expected &= gap > 0
    assert expected.sum() == 1 and expected[3]  # the sample whose VQ is 9: the others rank it low
    assert [m.tolist() for m in masks] == [expected[:3].tolist(), expected[3:].tolist()]
    assert trainer.selective.history and trainer.selective.beta_sel == pytest.approx(0.1)


def test_dynamic_reference_is_copied_exactly_when_the_controller_says(pocket):
    policy = _pocket_policy_with(pocket[0], ("trained",))
    trainer = _trainer(policy, nft_selective_reg=True)
    settings = dict(kl_threshold=0.1, min_threshold=0.05, max_threshold=0.15, max_epochs_without_copy=2)
    trainer.reference, independent = DynamicReferenceController(**settings), DynamicReferenceController(**settings)
    t = policy.transformer
    reference = export_adapter_state(t, REFERENCE_ADAPTER)
    decisions = []
    for epoch, kl in enumerate([None, 0.5, 0.01, 0.02, 0.01, 0.2, 0.0, 0.0, 0.0, 0.3]):
        theta = _randomise(t, "trained", seed=epoch)
        trainer.last_epoch_kl = kl
        copied = trainer.begin_epoch()
        assert copied == independent.should_copy(kl, epoch)
        decisions.append(copied)
        if copied:
            reference = theta
        now = export_adapter_state(t, REFERENCE_ADAPTER)
        assert all(torch.equal(now[k], reference[k]) for k in now)
        trainer.end_epoch()
    assert decisions == [False, True, False, False, True, True, False, False, True, True]
    assert trainer.reference.state_dict() == independent.state_dict()


def test_invalid_settings_are_refused(pocket):
    policy = _pocket_policy_with(pocket[0], ("trained",))
    with pytest.raises(ValueError, match="on-policy"):
        _trainer(policy, mode="semi_on_policy")
    with pytest.raises(ValueError, match="nft_selective_reg"):
        NftObjective(policy, "trained", AlgorithmSettings(objective="nft", nft_selective_reg=True),
                     RewardSettings(weights={"TA": 1.0}), seed=0)


def _learner(weights, tmp_path, name: str) -> Learner:
    config = load_config(CONFIG_DIR / "pocket_nft.yaml", [
        f"policy.transformer_checkpoint={weights}", "lora.rank=4", "lora.alpha=8", "algorithm.group_size=3",
        "algorithm.anchors_per_group=2", "algorithm.updates_per_iteration=2", "algorithm.nft_window_chunks=1",
        "algorithm.nft_ema_rate=0.2", "algorithm.nft_micro_batch=2",
    ])
    return Learner(config.learner_settings().model_dump(mode="json"), (tmp_path / "store").as_uri(), str(tmp_path / name))


def _adapters(learner) -> dict[str, dict[str, torch.Tensor]]:
    t = learner.policy.transformer
    return {n: export_adapter_state(t, n) for n in (learner.adapter, OLD_ADAPTER, REFERENCE_ADAPTER)}


def _assert_same(a: dict, b: dict) -> None:
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def test_broadcast_carries_the_old_adapter_and_resume_continues_exactly(pocket_weights, tmp_path):
    first = _learner(pocket_weights, tmp_path, "ckpt")
    # A controller that copies the reference whenever the regulariser is positive, so all three differ.
    make_controller = lambda: DynamicReferenceController(kl_threshold=0.0, min_threshold=0.0, max_threshold=0.0)  # noqa: E731
    first.objective.reference = make_controller()
    groups = [[_group(first.policy, 1, seed=1, group_id="g1")], [_group(first.policy, 0, seed=2, group_id="g2")]]
    first.train_groups(groups[0])
    state = first.adapter_state()
    old = export_adapter_state(first.policy.transformer, OLD_ADAPTER)
    theta = export_adapter_state(first.policy.transformer, first.adapter)
    assert all(torch.equal(state[k], old[k]) for k in state)  # the sampling policy is the old adapter
    assert any(not torch.equal(state[k], theta[k]) for k in state)
    first.save_checkpoint()
    saved, saved_nft = _adapters(first), first.objective.state_dict()
    stats = first.train_groups(groups[1])
    assert stats.objective_stats["nft_reference_copied"] is True  # the second epoch copied (the first one's regulariser > 0)

    second = _learner(pocket_weights, tmp_path, "ckpt")
    second.objective.reference = make_controller()
    second.restore_latest()
    _assert_same(saved, _adapters(second))
    assert second.objective.state_dict() == saved_nft
    second.train_groups(groups[1])
    _assert_same(_adapters(first), _adapters(second))
    assert second.objective.state_dict() == first.objective.state_dict()
    assert first.objective.steps == 4 and first.objective.epoch == 2


@pytest.mark.slow
def test_nft_runs_through_the_driver_on_a_local_ray_cluster(ray_local, pocket_weights, tmp_path):
    from controller.driver import train

    out = tmp_path / "run"
    overrides = ["rollout.num_workers=1", "algorithm.group_size=3", "algorithm.anchors_per_group=2",
                 "algorithm.groups_per_iteration=1", "algorithm.updates_per_iteration=1", "algorithm.nft_window_chunks=1",
                 "lora.rank=4", "lora.alpha=8", "run.eval_prompts_limit=1", "run.eval_every=0", "run.checkpoint_every=1",
                 "run.iterations=2", f"policy.transformer_checkpoint={pocket_weights}"]
    rows = train(load_config(CONFIG_DIR / "pocket_nft.yaml", overrides), out)
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["groups"] == 1 for r in rows)
    assert math.isfinite(rows[-1]["eval_reward_mean"])

    def adapters(iteration):
        path = out / "checkpoints" / f"iter_{iteration:06d}"
        load = lambda d: {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in load_file(path / d / "adapter_model.safetensors").items()}  # noqa: E731
        return load("adapter"), load("adapter_nft_old"), json.loads((path / "state.json").read_text())

    _, old1, _ = adapters(1)
    theta2, old2, state = adapters(2)
    assert state["nft"]["steps"] == 2 and state["nft"]["epoch"] == 2
    assert any(v.abs().sum() > 0 for k, v in theta2.items() if "lora_B" in k)
    decay = min(0.01 * 2, 0.5)  # pocket_nft.yaml: nft_ema_rate 0.01, two optimiser steps so far
    for k in old2:
        torch.testing.assert_close(old2[k], decay * old1[k] + (1 - decay) * theta2[k], rtol=1e-5, atol=1e-7)
