"""Objectives and the teacher sampler of the pocket generator's two-stage training.

Stage 1, teacher (flow matching with teacher forcing). Each chunk ``c`` of a clean video ``x0`` gets
its own noise level ``sigma_c`` and is noised as ``x_c = (1 - sigma_c) x0_c + sigma_c eps_c``; the
model sees ``[clean x0 | noisy x]`` under the teacher-forcing mask (a noisy chunk attends to the clean
copies of earlier chunks and to itself, as it will attend to the KV cache when streaming) and
predicts the flow ``v``; the loss is

    L_fm = mean_c || v_theta(x_c, sigma_c | x0_{<c}) - (eps_c - x0_c) ||^2.

Teacher sampling is the probability-flow ODE ``dx/dsigma = v`` integrated chunk by chunk with Euler
steps on a shifted grid, each finished chunk written into the KV cache at ``t = 0``: a deterministic
map from each chunk's initial noise (and the context) to its content.

Stage 2, student (ODE-trajectory regression, CausVid / Self-Forcing "ODE initialisation"). For ODE
pairs ``(eps_c, E_c)`` (initial noise -> teacher endpoint) and the sampler's timesteps
``t_0 > ... > t_{T-1}``, each chunk gets a step ``k``; its input is the initial noise at ``k = 0``
(``sigma_0 = 1``) and a re-noised endpoint ``(1 - sigma_k) E_c + sigma_k xi`` (fresh ``xi``, what the
sampler feeds after a step that predicted ``E_c``) otherwise; the loss is on the x0 prediction

    L_ode = mean_c || x_in - sigma_k v_theta(x_in, t_k | E_{<c}) - E_c ||^2.

The first step learns the teacher's noise -> video map, so the student's output depends on each
chunk's initial noise; later steps learn to keep what the input already shows, so re-noise draws
change little.
"""

from __future__ import annotations

import torch

from policy.transformer_causal_wan import CausalWanTransformer3DModel


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift ``sigma = shift u / (1 + (shift - 1) u)`` (identity for shift 1)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def per_frame(values: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """Per-chunk values ``[B, L]`` repeated over each chunk's frames -> ``[B, L * f]``."""
    return values.repeat_interleave(frames_per_chunk, dim=1)


def _bcast(per_frame_values: torch.Tensor) -> torch.Tensor:
    return per_frame_values[:, :, None, None, None]


def flow_matching_loss(
    model: CausalWanTransformer3DModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    chunk_sigmas: torch.Tensor,
    text: torch.Tensor,
    frames_per_chunk: int,
) -> torch.Tensor:
    """``L_fm`` for clean latents ``x0 [B, F, C, H, W]``, noise like it and ``chunk_sigmas [B, L]``."""
    sigma = per_frame(chunk_sigmas, frames_per_chunk).to(x0.dtype)
    x_t = (1.0 - _bcast(sigma)) * x0 + _bcast(sigma) * noise
    flow = model.forward_dense(x_t, sigma * 1000.0, text, frames_per_chunk, clean_latents=x0)
    return (flow - (noise - x0)).pow(2).mean()


def ode_regression_loss(
    model: CausalWanTransformer3DModel,
    initial_noise: torch.Tensor,
    endpoints: torch.Tensor,
    text: torch.Tensor,
    frames_per_chunk: int,
    timesteps: torch.Tensor,
    chunk_steps: torch.Tensor,
    fresh_noise: torch.Tensor,
) -> torch.Tensor:
    """``L_ode``: initial noise and endpoints ``[B, F, C, H, W]``, ``chunk_steps [B, L]`` indices into ``timesteps``."""
    t = per_frame(timesteps[chunk_steps], frames_per_chunk).to(endpoints.dtype)  # [B, F]
    sigma = _bcast(t / 1000.0)
    renoised = (1.0 - sigma) * endpoints + sigma * fresh_noise
    first = _bcast(per_frame(chunk_steps == 0, frames_per_chunk))
    x_in = torch.where(first, initial_noise, renoised)
    flow = model.forward_dense(x_in, t, text, frames_per_chunk, clean_latents=endpoints)
    return (x_in - sigma * flow - endpoints).pow(2).mean()


@torch.no_grad()
def teacher_sample(
    model: CausalWanTransformer3DModel,
    text: torch.Tensor,
    initial_noise: torch.Tensor,
    frames_per_chunk: int,
    num_steps: int = 16,
    shift: float = 3.0,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Endpoints ``[B, F, C, H, W]`` of the chunk-wise probability-flow ODE from ``initial_noise``.

    With ``guidance != 1`` the flow is ``v_uncond + guidance (v_cond - v_uncond)``, the unconditional
    branch using an all-zero text (what the teacher saw under text dropout) and its own KV cache.
    """
    b, frames, _, h, w = initial_noise.shape
    if frames % frames_per_chunk:
        raise ValueError(f"{frames} latent frames are not a multiple of frames_per_chunk={frames_per_chunk}")
    guided = guidance != 1.0
    if guided:
        text = torch.cat([text, torch.zeros_like(text)])
    cache = model.new_kv_cache(text.shape[0], frames, h, w)
    grid = shifted_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)
    chunks = []
    for start in range(0, frames, frames_per_chunk):
        x = initial_noise[:, start : start + frames_per_chunk].to(torch.float64)
        for i in range(num_steps):
            inp = torch.cat([x, x]) if guided else x
            t = torch.full((inp.shape[0], frames_per_chunk), float(grid[i]) * 1000.0)
            flow = model.forward_chunk(inp.float(), t, cache, start, text, write_cache=False).double()
            if guided:
                cond, uncond = flow.chunk(2)
                flow = uncond + guidance * (cond - uncond)
            x = x + (grid[i + 1] - grid[i]) * flow
        clean = x.float()
        inp = torch.cat([clean, clean]) if guided else clean
        model.forward_chunk(inp, torch.zeros(inp.shape[0], frames_per_chunk), cache, start, text, write_cache=True)
        chunks.append(clean)
    return torch.cat(chunks, dim=1)
