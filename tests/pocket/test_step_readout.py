"""The step-readout diagnostic against direct computations with stand-in flows, and on the shipped weights."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pocket import domain, load_pocket_policy
from pocket.preset import fit_pocket_codec
from experiments.pocket_studies.step_readout import markdown, step_readout
from policy.sampler import SamplerConfig

PROMPTS = domain.train_prompts()[:2]


class _Flow(torch.nn.Module):
    """``v = scale(t) * x`` for a stand-in transformer."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward_dense(self, latents, timesteps, text, frames_per_chunk):
        return self.scale(timesteps[:, :1, None, None, None] / 1000.0) * latents


def _stub_policy(scale):
    return SimpleNamespace(
        frames_per_chunk=2, codec=fit_pocket_codec(), device=torch.device("cpu"), dtype=torch.float32,
        sampler=SamplerConfig(), transformer=_Flow(scale), text_conditioning=lambda p: torch.zeros(len(p), 4, 8),
    )


def _real_first_chunks(scenes: int) -> np.ndarray:
    codec = fit_pocket_codec()
    return np.stack([codec.encode(domain.generate_batch([p] * scenes, range(scenes)))[:, :2].numpy() for p in PROMPTS])


def test_a_step_that_outputs_zero_or_its_input_scores_as_computed_directly():
    real = _real_first_chunks(4).astype(np.float64)
    mean_video_error = ((real - real.mean(axis=1, keepdims=True)) ** 2).mean()
    scene_var = real.var(axis=1, ddof=1).mean()

    zero = step_readout(_stub_policy(lambda s: 1.0 / s), PROMPTS, scenes=4, noises=3)  # x0 = x - s (x / s) = 0
    assert [r.timestep for r in zero] == pytest.approx(SamplerConfig().timesteps().tolist())
    for row in zero:
        assert row.mean_video_error == pytest.approx(mean_video_error, rel=1e-5)
        assert row.x0_error == pytest.approx((real**2).mean(), rel=1e-5)
        assert row.spread_over_noise == pytest.approx(0.0, abs=1e-9)

    copy = step_readout(_stub_policy(lambda s: 0.0), PROMPTS, scenes=4, noises=8)  # x0 = x = (1 - s) E + s xi
    for row in copy:
        s = row.sigma
        assert row.x0_error == pytest.approx(s * s * ((real**2).mean() + 1.0), rel=0.05)
        assert row.spread_over_noise == pytest.approx(s * s / scene_var, rel=0.05)
    assert "| 4 | 625.0 | 0.6250 |" in markdown(copy)


def test_the_shipped_generator_recovers_a_real_chunk_at_its_last_step():
    rows = step_readout(load_pocket_policy(), domain.train_prompts()[::48], scenes=4, noises=4)
    assert len(rows) == 4
    assert rows[-1].x0_error < 0.5 * rows[-1].mean_video_error, markdown(rows)
