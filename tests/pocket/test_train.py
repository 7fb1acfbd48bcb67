"""The pocket generator's objectives, teacher ODE sampler and a few steps of the training command."""

from __future__ import annotations

import json

import numpy as np
import torch

from policy.pocket import preset, train
from policy.pocket.distill import flow_matching_loss, ode_regression_loss, shifted_sigmas, teacher_sample
from policy.transformer_causal_wan import CausalWanTransformer3DModel

TINY = {**preset.POCKET_TRANSFORMER, "num_layers": 1, "num_attention_heads": 2, "ffn_dim": 64}


def _tiny_model(seed: int = 0) -> CausalWanTransformer3DModel:
    torch.manual_seed(seed)
    return CausalWanTransformer3DModel(**TINY)


def test_shifted_sigmas_match_the_sampler_warp():
    u = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(shifted_sigmas(u, 5.0) * 1000, preset.POCKET_PRESET.sampler.timesteps().double(), atol=1e-3)


def test_flow_matching_loss_decreases_when_fitting_a_batch():
    model = _tiny_model()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 8, 96, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    sigmas = torch.rand(2, 4, generator=gen)
    text = torch.randn(2, 12, 32, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = flow_matching_loss(model, x0, noise, sigmas, text, 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses


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


class _PointMassFlow(torch.nn.Module):
    """The exact flow of a point mass at ``target``: v = (x - target) / sigma, chunk by chunk."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.calls = 0

    def new_kv_cache(self, batch, frames, h, w):
        return None

    def forward_chunk(self, x, t, cache, start, text, write_cache=True):
        self.calls += 1
        if not write_cache:
            sigma = t[:, :1, None, None, None].double() / 1000
            return (x.double() - self.target[:, start : start + x.shape[1]]) / sigma


def test_teacher_ode_lands_on_the_point_mass_from_any_noise():
    target = torch.randn(3, 8, 4, 2, 2, dtype=torch.float64)
    model = _PointMassFlow(target)
    out = teacher_sample(model, torch.zeros(3, 4, 8), torch.randn(3, 8, 4, 2, 2), 2, num_steps=5, shift=3.0)
    assert torch.allclose(out.double(), target, atol=1e-5)
    assert model.calls == 4 * (5 + 1)  # 5 Euler steps and one cache write per chunk


def test_training_command_runs_a_few_steps_and_writes_loadable_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(preset, "POCKET_TRANSFORMER", TINY)
    cfg = train.PocketTrainConfig(batch_size=2, pool_size=4, pool_refresh=1, teacher_steps=3, ode_pairs=2, ode_steps=2,
                                  ode_batch=2, student_steps=3, warmup_steps=1)
    record = train.train(cfg, tmp_path)
    written = json.loads((tmp_path / "pocket.json").read_text())
    assert written["training"]["config"]["teacher_steps"] == 3 and written["latent_scale"] == preset.LATENT_SCALE
    assert np.isfinite(record["training"]["teacher_loss_final"]) and np.isfinite(record["training"]["student_loss_final"])
    policy = preset.load_pocket_policy(tmp_path)
    assert policy.num_chunks == 4 and policy.frames_per_chunk == 2 and policy.latent_shape == (96, 8, 8)
