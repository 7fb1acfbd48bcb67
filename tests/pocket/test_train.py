"""The pocket generator's objectives, teacher ODE sampler and a few steps of the training command."""

from __future__ import annotations

import json

import numpy as np
import torch

from pocket import domain, preset, train, verifiers
from pocket.distill import (
    empirical_flow_choice,
    empirical_posterior_mean,
    ode_regression_loss,
    shifted_sigmas,
    start_as_identity_flow,
)
from pocket.teacher import make_ode_pairs, pair_noise
from policy.sampler import SamplerConfig
from policy.transformer_causal_wan import CausalWanTransformer3DModel

TINY = {**preset.POCKET_TRANSFORMER, "num_layers": 1, "num_attention_heads": 2, "ffn_dim": 64}


def _tiny_model(seed: int = 0) -> CausalWanTransformer3DModel:
    torch.manual_seed(seed)
    return CausalWanTransformer3DModel(**TINY)


def test_shifted_sigmas_match_the_sampler_warp():
    u = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(shifted_sigmas(u, 5.0) * 1000, SamplerConfig().timesteps().double(), atol=1e-3)
    pocket = preset.POCKET_PRESET.sampler.timesteps().double()
    assert torch.allclose(shifted_sigmas(u, preset.POCKET_SHIFT) * 1000, pocket, atol=1e-3)


class _ZeroFlow(torch.nn.Module):
    """Stands in for the transformer: predicts v = 0 and records what it was fed."""

    def forward_dense(self, latents, timesteps, text, frames_per_chunk, clean_latents=None):
        self.seen = (latents, timesteps, clean_latents)
        return torch.zeros_like(latents)


def test_ode_regression_feeds_initial_noise_at_step_one_and_renoised_endpoints_later():
    gen = torch.Generator().manual_seed(1)
    noise, endpoints, fresh = (torch.randn(2, 8, 3, 2, 2, generator=gen) for _ in range(3))
    timesteps = torch.tensor([1000.0, 937.5, 833.3333, 625.0])
    steps = torch.tensor([[0, 1, 2, 3], [3, 0, 0, 2]])
    model = _ZeroFlow()
    loss = ode_regression_loss(model, noise, endpoints, torch.zeros(2, 4, 8), 2, timesteps, steps, fresh)
    expected_in = torch.empty_like(noise)
    for b in range(2):
        for c in range(4):
            sl = slice(2 * c, 2 * c + 2)
            s = timesteps[steps[b, c]] / 1000
            expected_in[b, sl] = noise[b, sl] if steps[b, c] == 0 else (1 - s) * endpoints[b, sl] + s * fresh[b, sl]
    fed, t, clean = model.seen
    assert torch.allclose(fed, expected_in, atol=1e-6) and clean is endpoints
    assert torch.allclose(t, timesteps[steps].repeat_interleave(2, dim=1))
    assert torch.allclose(loss, (expected_in - endpoints).pow(2).mean(), atol=1e-6)

    context = endpoints + 0.1
    weights = torch.tensor([2.0, 1.0, 1.0, 1.0])
    loss = ode_regression_loss(model, noise, endpoints, torch.zeros(2, 4, 8), 2, timesteps, steps, fresh, context, weights)
    assert model.seen[2] is context
    per_frame_err = (expected_in - endpoints).pow(2).mean(dim=(2, 3, 4))
    frame_w = (weights / weights.mean()).repeat_interleave(2)
    assert torch.allclose(loss, (per_frame_err * frame_w).mean(), atol=1e-6)


def test_student_loss_decreases_when_fitting_a_batch():
    model = _tiny_model()
    gen = torch.Generator().manual_seed(0)
    noise, endpoints, fresh = (torch.randn(2, 8, 16, 8, 8, generator=gen) for _ in range(3))
    text = torch.randn(2, 12, 32, generator=gen)
    steps = torch.tensor([[0, 1, 2, 3], [2, 0, 3, 1]])
    timesteps = preset.POCKET_PRESET.sampler.timesteps()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = ode_regression_loss(model, noise, endpoints, text, 2, timesteps, steps, fresh)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses


def test_identity_start_predicts_the_input_as_flow_and_still_trains_every_block():
    model = _tiny_model()
    start_as_identity_flow(model)
    x = torch.randn(2, 4, *preset.LATENT_SHAPE)
    text = torch.randn(2, preset.TEXT_TOKENS, preset.TEXT_DIM)
    for t in (1000.0, 625.0):
        v = model.forward_dense(x, torch.full((2, 4), t), text, 2, clean_latents=x)
        assert (v - x).pow(2).mean() < 0.03 * x.pow(2).mean()  # the copy, up to the layer norm's per-token gain
    fresh = _tiny_model()
    assert (fresh.forward_dense(x, torch.full((2, 4), 1000.0), text, 2, clean_latents=x) - x).pow(2).mean() > 0.5
    v = model.forward_dense(x, torch.full((2, 4), 937.5), text, 2, clean_latents=x)
    v.pow(2).mean().backward()
    assert model.blocks[0].ffn.net[-1].weight.grad.abs().sum() > 0  # zero-initialised outputs still learn
    assert model.blocks[0].attn1.to_out[0].weight.grad.abs().sum() > 0


def test_empirical_posterior_mean_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(2)
    x, cands = torch.randn(3, 20, generator=gen, dtype=torch.float64), torch.randn(3, 5, 20, generator=gen, dtype=torch.float64)
    for sigma in (1.0, 0.9, 0.5, 0.05):
        expected = torch.empty(3, 20, dtype=torch.float64)
        for b in range(3):
            if sigma == 1.0:
                expected[b] = cands[b].mean(0)
                continue
            log_lik = torch.stack([-((x[b] - (1 - sigma) * c) ** 2).sum() / (2 * sigma**2) for c in cands[b]])
            expected[b] = (torch.exp(log_lik - log_lik.logsumexp(0))[:, None] * cands[b]).sum(0)
        assert torch.allclose(empirical_posterior_mean(x, cands, sigma), expected, atol=1e-9)


def test_empirical_flow_carries_a_candidate_shaped_noise_to_that_candidate():
    gen = torch.Generator().manual_seed(3)
    cands = torch.randn(4, 6, 500, generator=gen)
    pick = torch.tensor([0, 5, 2, 3])
    assert torch.equal(empirical_flow_choice(cands[torch.arange(4), pick], cands), pick)
    noise = torch.randn(64, 500, generator=gen)
    choices = empirical_flow_choice(noise, cands[:1].expand(64, -1, -1))
    assert len(set(choices.tolist())) >= 4  # different noises reach different candidates


def test_teacher_pairs_are_real_videos_of_their_prompts_and_reproducible():
    prompts = domain.train_prompts()[:3]
    codec = preset.fit_pocket_codec()
    make = lambda: make_ode_pairs(prompts, 6, 1, codec, 2, 8, preset.LATENT_SHAPE, (8, 4), 8)  # noqa: E731
    a, b = make(), make()
    assert np.array_equal(a.videos, b.videos) and np.array_equal(a.noise_seeds, b.noise_seeds)
    for video, pid in zip(a.videos, a.prompt_ids):
        scores = verifiers.score_video(video, prompts[pid])
        assert min(scores.values()) > 0.9, scores
    noise = pair_noise(a.noise_seeds[:2], 8, preset.LATENT_SHAPE)
    assert noise.shape == (2, 8, *preset.LATENT_SHAPE) and torch.equal(noise, pair_noise(a.noise_seeds[:2], 8, preset.LATENT_SHAPE))


def test_training_command_runs_a_few_steps_and_writes_loadable_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(preset, "POCKET_TRANSFORMER", TINY)
    cfg = train.PocketTrainConfig(batch_size=2, ode_pairs=4, candidates_first=4, candidates_next=2, ode_steps=4,
                                  student_steps=3, warmup_steps=1, imle_steps=2, imle_rows=1, imle_noises=2,
                                  imle_alternatives=2, sampler_shift=0.5)
    record = train.train(cfg, tmp_path)
    written = json.loads((tmp_path / "pocket.json").read_text())
    assert written["training"]["config"]["student_steps"] == 3 and written["latent_scale"] == preset.LATENT_SCALE
    assert np.isfinite(record["training"]["student_loss_final"]) and np.isfinite(record["training"]["first_step_loss_final"])
    policy = preset.load_pocket_policy(tmp_path)
    assert policy.num_chunks == 4 and policy.frames_per_chunk == 2 and policy.latent_shape == (16, 8, 8)
    # the weights record, and load with, the sampler stage 3 trained them for
    assert written["sampler"]["shift"] == 0.5
    assert np.allclose(policy.timesteps().tolist(), [1000.0, 600.0, 333.3333, 142.8571], atol=1e-3)

    # stage 3 alone, from those weights
    again = train.train(cfg.model_copy(update={"init_from": str(tmp_path), "checkpoint_every": 2}), tmp_path / "stage3")
    assert again["training"]["student_loss_final"] is None and np.isfinite(again["training"]["first_step_loss_final"])
    snapshot = json.loads((tmp_path / "stage3" / "first_step_step_00002" / "pocket.json").read_text())
    assert snapshot["training"]["stage"] == "first_step" and snapshot["training"]["step"] == 2
    before = policy.transformer.state_dict()
    after = preset.load_pocket_policy(tmp_path / "stage3").transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
