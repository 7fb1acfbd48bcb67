"""Few-step sampler: published warped timesteps and the step rule against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from policy.sampler import SamplerConfig, renoise, x0_from_flow


def test_warped_timesteps_are_the_published_self_forcing_values():
    ts = SamplerConfig().warped_timesteps()
    assert ts[0] == 1000.0 and ts[1] == 937.5 and ts[3] == 625.0
    assert math.isclose(ts[2], 2500.0 / 3.0, rel_tol=0, abs_tol=1e-9)
    assert SamplerConfig().timesteps().tolist() == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-4)


def test_warp_matches_a_shifted_thousand_step_grid():
    """Self-Forcing's route: a 1000-point sigma grid (extra step dropped), shifted, indexed by 1000 - step."""
    shift = 5.0
    grid = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
    grid = shift * grid / (1 + (shift - 1) * grid) * 1000
    grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    steps = (1000, 800, 600, 400, 200, 50)
    expected = [grid[1000 - s].item() for s in steps]
    assert SamplerConfig(denoising_step_list=steps).warped_timesteps() == pytest.approx(expected, abs=1e-9)
    assert SamplerConfig(warp_denoising_step=False).warped_timesteps() == [1000.0, 750.0, 500.0, 250.0]


def test_x0_from_flow_inverts_the_flow_matching_interpolation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.9375, 0.625])
    x_t = (1 - sigma.view(2, 1, 1, 1, 1)) * x0 + sigma.view(2, 1, 1, 1, 1) * eps
    assert torch.allclose(x0_from_flow(x_t, eps - x0, sigma), x0, atol=1e-6)


def test_renoise_eta_one_is_a_fresh_gaussian_and_eta_zero_keeps_the_implied_noise():
    g = torch.Generator().manual_seed(1)
    x0, eps, fresh = (torch.randn(1, 3, 4, 5, 5, generator=g) for _ in range(3))
    s, s_next = 0.9375, 0.8333
    x_t = (1 - s) * x0 + s * eps
    out = renoise(x_t, x0, s, s_next, fresh, eta=1.0)
    assert torch.allclose(out, (1 - s_next) * x0 + s_next * fresh, atol=1e-6)
    out = renoise(x_t, x0, s, s_next, fresh, eta=0.0)
    assert torch.allclose(out, (1 - s_next) * x0 + s_next * eps, atol=1e-5)
    eta = 0.3
    out = renoise(x_t, x0, s, s_next, fresh, eta=eta)
    mixed = math.sqrt(1 - eta**2) * eps + eta * fresh
    assert torch.allclose(out, (1 - s_next) * x0 + s_next * mixed, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"denoising_step_list": (1000, 1000)}, "strictly decreasing"),
        ({"denoising_step_list": (1200, 500)}, "outside"),
        ({"denoising_step_list": ()}, "empty"),
        ({"eta": 1.5}, "eta"),
        ({"shift": 0}, "shift"),
    ],
)
def test_bad_sampler_config_names_the_problem(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        SamplerConfig(**kwargs)
