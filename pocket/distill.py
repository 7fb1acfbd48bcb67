"""The pocket generator's teacher (an exact probability-flow ODE) and its student objective.

Teacher. The pocket domain is a simulator, so the conditional distribution of a chunk is known: for
chunk 0 it is the prompt's scenes, for chunk ``c > 0`` it is the continuations of the scene so far
(``domain.continue_params``: the same past, fresh velocity knots from frame ``4 c`` on). For a set of
``K`` candidates ``{x_k}`` drawn from it, the flow of the empirical distribution is exact:

    w_k(x, sigma) = softmax_k( -|| x - (1 - sigma) x_k ||^2 / (2 sigma^2) ),
    x0_hat = sum_k w_k x_k,      v(x, sigma) = (x - x0_hat) / sigma,

and integrating ``dx/dsigma = v`` from ``sigma = 1`` (the chunk's initial noise) to 0 (Euler steps)
moves the noise onto one candidate (32 steps, float32): a deterministic map from each chunk's initial noise and its
context to its content, the role a many-step teacher's ODE plays in CausVid / Self-Forcing's "ODE
initialisation". The endpoint is snapped to the nearest candidate (it is within rounding of one
unless two tie), so every teacher video is a real domain video.

Student (ODE-trajectory regression). For pairs ``(eps_c, E_c)`` (initial noise -> teacher endpoint)
and the sampler's timesteps ``t_0 > ... > t_{T-1}``, each chunk of a training video gets a step ``k``;
its input is the initial noise at ``k = 0`` (``sigma_0 = 1``) and a re-noised endpoint
``(1 - sigma_k) E_c + sigma_k xi`` (fresh ``xi``: what the sampler feeds after a step that predicted
``E_c``) otherwise; with the clean endpoints as teacher-forced context the loss is on the x0 prediction

    L_ode = mean_c || x_in - sigma_k v_theta(x_in, t_k | E_{<c}) - E_c ||^2.

The clean context may carry a little Gaussian noise (the student's own chunks in the KV cache are
never exactly real), and chunk 0, which every later chunk builds on and which has no context to
lean on, may weigh more. The intent: the first step learns the noise -> video map, so the output
depends on each chunk's initial noise, and later steps keep what their input already shows. Trained
this way alone it does not: the first step learns the per-prompt mean video and the content comes
from the re-noise draws. ``first_step_imle_loss`` (the training command's stage 3) makes the first
step read its noise, and ``later_steps_chain_loss`` trains the later steps on the student's own
predictions to carry out the first step's choice (docs/pocket.md, "Baseline and the Figure 6 study").
"""

from __future__ import annotations

import torch


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift ``sigma = shift u / (1 + (shift - 1) u)`` (identity for shift 1)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def per_frame(values: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """Per-chunk values ``[B, L]`` repeated over each chunk's frames -> ``[B, L * f]``."""
    return values.repeat_interleave(frames_per_chunk, dim=1)


def _bcast(per_frame_values: torch.Tensor) -> torch.Tensor:
    return per_frame_values[:, :, None, None, None]


def empirical_posterior_mean(
    x: torch.Tensor, candidates: torch.Tensor, sigma: float, candidate_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """``E[x0 | x_sigma = x]`` under the uniform distribution on ``candidates``: ``x [B, D]``, ``candidates [B, K, D]``.

    ``candidate_sq [B, K]`` (the candidates' squared norms) may be passed to save recomputing it.
    """
    if sigma >= 1.0:
        return candidates.mean(dim=1)
    if candidate_sq is None:
        candidate_sq = (candidates**2).sum(-1)
    a = 1.0 - sigma
    # |x - a c_k|^2 up to the k-independent |x|^2, which the softmax ignores
    sq = a * a * candidate_sq - 2 * a * torch.einsum("bd,bkd->bk", x, candidates)
    weights = torch.softmax(-sq / (2 * sigma * sigma), dim=1)
    return torch.einsum("bk,bkd->bd", weights, candidates)


def empirical_flow_choice(noise: torch.Tensor, candidates: torch.Tensor, num_steps: int = 32) -> torch.Tensor:
    """Index ``[B]`` of the candidate the probability-flow ODE carries ``noise [B, D]`` to (Euler steps)."""
    x = noise.float()
    cands = candidates.float()
    candidate_sq = (cands**2).sum(-1)
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    for sigma, nxt in zip(grid[:-1], grid[1:]):
        x0_hat = empirical_posterior_mean(x, cands, sigma, candidate_sq)
        x = x + (nxt - sigma) * (x - x0_hat) / sigma
    return (candidate_sq - 2 * torch.einsum("bd,bkd->bk", x, cands)).argmin(dim=1)


@torch.no_grad()
def start_as_identity_flow(model) -> None:
    """Initialise a Wan transformer so that its flow is its input, ``v = x_t`` (so ``x0 = (1 - sigma) x_t``).

    At ``sigma = 1`` the sampler forms ``x0 = x_t - v``: the network must carry its input noise to the
    output exactly, and a small randomly initialised network spends most of a CPU budget learning that
    copy (its errors show as blocky noise), not the content. Here the patch embedding writes each
    token's latent values into the first channels of the residual stream, the blocks start as the
    identity (their output projections zero, as adaLN-Zero starts DiT blocks), the time embedding
    starts at zero, and the output projection reads those channels back, undoing the final layer
    norm's gain for a Gaussian token. Training then learns only what differs from the copy.
    """
    dim = model.proj_out.in_features
    channels = model.config.in_channels
    p_t, p_h, p_w = model.config.patch_size
    if p_t != 1 or model.config.out_channels not in (None, channels):
        raise ValueError("start_as_identity_flow needs a temporal patch of 1 and as many output as input channels")
    values = channels * p_h * p_w
    if values > dim:
        raise ValueError(f"a token of {values} latent values does not fit a residual stream of width {dim}")
    embed, out = model.patch_embedding, model.proj_out
    embed.weight.zero_()
    embed.bias.zero_()
    out.weight.zero_()
    out.bias.zero_()
    gain = (values / dim) ** 0.5  # layer norm over dim channels of which `values` carry unit-variance noise
    for ph in range(p_h):  # the output unpatchifies features in (row, column, channel) order
        for pw in range(p_w):
            for c in range(channels):
                j = (ph * p_w + pw) * channels + c
                embed.weight[j, c, 0, ph, pw] = 1.0
                out.weight[j, j] = gain
    for block in model.blocks:
        for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
    model.scale_shift_table.zero_()
    model.condition_embedder.time_embedder.linear_2.weight.zero_()
    model.condition_embedder.time_embedder.linear_2.bias.zero_()


def ode_regression_loss(
    model,
    initial_noise: torch.Tensor,
    endpoints: torch.Tensor,
    text: torch.Tensor,
    frames_per_chunk: int,
    timesteps: torch.Tensor,
    chunk_steps: torch.Tensor,
    fresh_noise: torch.Tensor,
    context: torch.Tensor | None = None,
    chunk_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L_ode``: initial noise and endpoints ``[B, F, C, H, W]``, ``chunk_steps [B, L]`` indices into ``timesteps``.

    ``context`` replaces the endpoints as the teacher-forced clean context (e.g. the endpoints with a
    little noise, so the student tolerates its own imperfect chunks in the KV cache); ``chunk_weights [L]``
    weight each chunk's error (normalised to mean 1).
    """
    t = per_frame(timesteps[chunk_steps], frames_per_chunk).to(endpoints.dtype)  # [B, F]
    sigma = _bcast(t / 1000.0)
    renoised = (1.0 - sigma) * endpoints + sigma * fresh_noise
    first = _bcast(per_frame(chunk_steps == 0, frames_per_chunk))
    x_in = torch.where(first, initial_noise, renoised)
    flow = model.forward_dense(x_in, t, text, frames_per_chunk, clean_latents=endpoints if context is None else context)
    err = (x_in - sigma * flow - endpoints).pow(2).mean(dim=(2, 3, 4))  # [B, F]
    if chunk_weights is not None:
        w = per_frame((chunk_weights / chunk_weights.mean())[None], frames_per_chunk).to(err)
        err = err * w
    return err.mean()


def first_step_predictions(
    model,
    initial_noise: torch.Tensor,
    context: torch.Tensor,
    text: torch.Tensor,
    frames_per_chunk: int,
    first_timestep: float = 1000.0,
) -> torch.Tensor:
    """The first step's x0 ``[P, M, F, C, H, W]`` from ``initial_noise [P, M, F, C, H, W]``, every chunk at
    ``first_timestep`` and teacher-forced on ``context [P, F, C, H, W]``'s earlier chunks; ``text [P, S, D]``."""
    p, m, frames = initial_noise.shape[:3]
    x = initial_noise.flatten(0, 1)
    t = torch.full((p * m, frames), first_timestep, dtype=x.dtype, device=x.device)
    clean = context.repeat_interleave(m, dim=0)
    flow = model.forward_dense(x, t, text.repeat_interleave(m, dim=0), frames_per_chunk, clean_latents=clean)
    return (x - (first_timestep / 1000.0) * flow).view(initial_noise.shape)


def _chunk_distances(pred: torch.Tensor, alternatives: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """Mean squared error ``[P, N, M, L]`` of every alternative ``[P, N, F, ...]`` to every prediction
    ``[P, M, F, ...]``, per chunk."""
    chunks = pred.shape[2] // frames_per_chunk
    per_chunk = lambda v: v.reshape(*v.shape[:2], chunks, -1)  # noqa: E731  [P, K, L, D]
    return (per_chunk(alternatives)[:, :, None] - per_chunk(pred)[:, None]).pow(2).mean(-1)


def first_step_imle_loss(
    model,
    initial_noise: torch.Tensor,
    alternatives: torch.Tensor,
    context: torch.Tensor,
    text: torch.Tensor,
    frames_per_chunk: int,
    first_timestep: float = 1000.0,
) -> torch.Tensor:
    """Implicit maximum likelihood for the first step: every real alternative pulls the nearest of M predictions.

    ``initial_noise [P, M, F, C, H, W]``: M initial noises per row; ``alternatives [P, N, F, C, H, W]``: for
    each chunk ``c``, N real alternatives of chunk ``c`` that share ``context [P, F, C, H, W]``'s earlier
    chunks (the teacher-forced context); ``text [P, S, D]``. Every chunk is predicted from its initial
    noise at ``first_timestep``; per chunk and row, each alternative is matched to its nearest
    prediction (squared error over the chunk) and the loss is the mean matched error. Regression onto
    a fixed noise -> video map pulls a small network to the mean video; matching instead lets each
    noise keep whichever real chunk it is already closest to, so the first step learns to cover the
    real chunks with different noises, as distribution-matching distillation (DMD) makes a few-step
    generator's output depend on its noise.
    """
    pred = first_step_predictions(model, initial_noise, context, text, frames_per_chunk, first_timestep)
    return imle_loss(pred, alternatives, frames_per_chunk)


def imle_loss(pred: torch.Tensor, alternatives: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """``first_step_imle_loss`` on given predictions ``[P, M, F, ...]``: mean over alternatives of the error
    to their nearest prediction, per chunk."""
    return _chunk_distances(pred, alternatives, frames_per_chunk).min(dim=2).values.mean()


def nearest_alternatives(pred: torch.Tensor, alternatives: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """For every prediction ``[P, M, F, ...]`` and chunk, the real alternative ``[P, N, F, ...]`` nearest to it:
    the real chunk the prediction stands for. Returns ``[P, M, F, ...]``."""
    p, m, frames = pred.shape[:3]
    chunks = frames // frames_per_chunk
    idx = _chunk_distances(pred, alternatives, frames_per_chunk).argmin(dim=1)  # [P, M, L]
    alt = alternatives.reshape(p, alternatives.shape[1], chunks, -1)
    picked = torch.gather(alt, 1, idx[..., None].expand(-1, -1, -1, alt.shape[-1]))  # [P, M, L, D]
    return picked.reshape(pred.shape)


def later_steps_chain_loss(
    model,
    start: torch.Tensor,
    targets: torch.Tensor,
    context: torch.Tensor,
    text: torch.Tensor,
    frames_per_chunk: int,
    timesteps: torch.Tensor,
    fresh_noise: torch.Tensor,
) -> torch.Tensor:
    """The later steps on the student's own chain, each regressed onto the real chunk its first step chose.

    ``start [B, F, C, H, W]``: the first step's predictions (no gradient flows into them); ``targets``
    of the same shape: per chunk, the real chunk nearest each prediction (``nearest_alternatives``);
    ``timesteps [K]``: the later steps' timesteps; ``fresh_noise [K, B, F, C, H, W]``: the re-noise draw
    before each. Step ``k`` sees ``(1 - sigma_k) x0_{k-1} + sigma_k xi_k`` with ``x0_{k-1}`` the previous
    step's own prediction, as the sampler feeds it, and the loss is the mean over steps of

        || x_in - sigma_k v_theta(x_in, t_k | context) - target ||^2.

    The target depends only on the first step's prediction, not on the re-noise draws, so the later
    steps learn to carry out the first step's choice whatever the draw: the near-determinism a
    distilled few-step sampler trained on its own rollouts has (Self-Forcing), which ODE regression
    on re-noised real endpoints does not give (it never sees the first step's imperfect predictions).
    """
    x = start.detach()
    losses = []
    for k in range(len(timesteps)):
        t = torch.full(x.shape[:2], float(timesteps[k]), dtype=x.dtype, device=x.device)
        sigma = float(timesteps[k]) / 1000.0
        x_in = (1.0 - sigma) * x + sigma * fresh_noise[k]
        flow = model.forward_dense(x_in, t, text, frames_per_chunk, clean_latents=context)
        pred = x_in - sigma * flow
        losses.append((pred - targets).pow(2).mean())
        x = pred.detach()
    return torch.stack(losses).mean()
