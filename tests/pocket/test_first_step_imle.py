"""The first step's IMLE objective and its real alternatives, against direct computations."""

from __future__ import annotations

import numpy as np
import torch

from pocket import domain
from pocket.distill import first_step_imle_loss, later_steps_chain_loss, nearest_alternatives
from pocket.teacher import continuation_sets


class _OffsetFlow(torch.nn.Module):
    """x0 = x - v = offset[row]: each (context, noise) row predicts its own learnable video."""

    def __init__(self, offsets: torch.Tensor):
        super().__init__()
        self.offsets = torch.nn.Parameter(offsets.clone())

    def forward_dense(self, latents, timesteps, text, frames_per_chunk, clean_latents=None):
        self.seen = (timesteps, text, clean_latents)
        return latents - self.offsets


def test_imle_loss_is_the_mean_nearest_prediction_error_and_pulls_only_the_nearest():
    gen = torch.Generator().manual_seed(0)
    p, m, n, frames, f = 2, 3, 4, 4, 2  # 2 chunks of 2 frames
    offsets = torch.randn(p * m, frames, 3, 2, 2, generator=gen, dtype=torch.float64)
    alternatives = torch.randn(p, n, frames, 3, 2, 2, generator=gen, dtype=torch.float64)
    context = torch.randn(p, frames, 3, 2, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(p, m, frames, 3, 2, 2, generator=gen, dtype=torch.float64)
    text = torch.arange(p, dtype=torch.float64).view(p, 1, 1).expand(p, 5, 7)
    model = _OffsetFlow(offsets)
    loss = first_step_imle_loss(model, noise, alternatives, context, text, f)

    pred = offsets.numpy().reshape(p, m, 2, -1)  # [p, m, chunk, D]
    alts = alternatives.numpy().reshape(p, n, 2, -1)
    errors, nearest = [], np.zeros((p, n, 2), dtype=int)
    for i in range(p):
        for c in range(2):
            for k in range(n):
                d = ((alts[i, k, c] - pred[i, :, c]) ** 2).mean(axis=-1)
                nearest[i, k, c] = d.argmin()
                errors.append(d.min())
    assert np.isclose(loss.item(), np.mean(errors), rtol=1e-12)

    timesteps, seen_text, clean = model.seen
    assert torch.all(timesteps == 1000.0) and torch.equal(clean, context.repeat_interleave(m, dim=0))
    assert torch.equal(seen_text[:m], text[:1].expand(m, -1, -1)) and torch.equal(seen_text[m:], text[1:].expand(m, -1, -1))

    loss.backward()
    grad = model.offsets.grad.view(p, m, 2, -1).abs().sum(-1)  # [p, m, chunk]
    for i in range(p):
        for c in range(2):
            pulled = set(nearest[i, :, c].tolist())
            for j in range(m):
                assert (grad[i, j, c] > 0) == (j in pulled), (i, j, c, pulled)


def test_alternatives_of_a_later_chunk_continue_the_context_and_chunk_zero_alternatives_are_new_scenes():
    sets = continuation_sets(domain.train_prompts(), rows=3, alternatives=4, rng=np.random.default_rng(0),
                             frames_per_chunk=2, time_stride=2)
    assert sets.context.shape == (3, 16, 32, 32, 3) and sets.alternatives.shape == (3, 4, 16, 32, 32, 3)
    for r in range(3):
        alts = sets.alternatives[r].astype(int)
        assert len({a[:4].tobytes() for a in alts}) == 4  # chunk 0: four different scenes
        for c in (1, 2, 3):
            first = 4 * c
            # knots up to c are shared, so the chunk's first two frames are the context's
            assert all(np.array_equal(a[first : first + 2], sets.context[r, first : first + 2]) for a in alts)
        assert any(not np.array_equal(a[12:16], alts[0][12:16]) for a in alts[1:])  # fresh knots after that


class _AffineFlow(torch.nn.Module):
    """v = scale * x_t - offset: a flow whose x0 is a known affine function of its input; records each call."""

    def __init__(self, scale: float, offset: torch.Tensor):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))
        self.offset = offset
        self.calls = []

    def forward_dense(self, latents, timesteps, text, frames_per_chunk, clean_latents=None):
        self.calls.append((latents.detach().clone(), timesteps.clone(), clean_latents))
        return self.scale * latents - self.offset


def test_nearest_alternatives_pick_per_chunk_the_real_chunk_closest_to_each_prediction():
    gen = torch.Generator().manual_seed(1)
    p, m, n, frames, f = 2, 3, 5, 6, 2  # 3 chunks
    pred = torch.randn(p, m, frames, 2, 2, 2, generator=gen, dtype=torch.float64)
    alts = torch.randn(p, n, frames, 2, 2, 2, generator=gen, dtype=torch.float64)
    picked = nearest_alternatives(pred, alts, f)
    assert picked.shape == pred.shape
    for i in range(p):
        for j in range(m):
            for c in range(3):
                frames_c = slice(c * f, (c + 1) * f)
                d = [float(((alts[i, k, frames_c] - pred[i, j, frames_c]) ** 2).sum()) for k in range(n)]
                assert torch.equal(picked[i, j, frames_c], alts[i, int(np.argmin(d)), frames_c]), (i, j, c)


def test_later_steps_chain_feeds_each_step_the_previous_prediction_re_noised_and_regresses_on_the_targets():
    gen = torch.Generator().manual_seed(2)
    b, frames, f = 3, 4, 2
    shape = (b, frames, 2, 2, 2)
    start = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(shape, generator=gen, dtype=torch.float64)
    context = torch.randn(shape, generator=gen, dtype=torch.float64)
    offset = torch.randn(shape, generator=gen, dtype=torch.float64)
    fresh = torch.randn((3, *shape), generator=gen, dtype=torch.float64)
    timesteps = torch.tensor([600.0, 333.0, 143.0])
    model = _AffineFlow(0.7, offset)
    loss = later_steps_chain_loss(model, start, targets, context, torch.zeros(b, 1, 1), f, timesteps, fresh)

    x, errors = start.detach().numpy(), []  # the same chain in numpy
    for k, t in enumerate(timesteps.tolist()):
        s = t / 1000.0
        x_in = (1 - s) * x + s * fresh[k].numpy()
        seen, seen_t, seen_context = model.calls[k]
        assert np.allclose(seen.numpy(), x_in, rtol=1e-12) and torch.all(seen_t == t) and seen_context is context
        x = x_in - s * (0.7 * x_in - offset.numpy())
        errors.append(((x - targets.numpy()) ** 2).mean())
    assert len(model.calls) == 3 and np.isclose(loss.item(), np.mean(errors), rtol=1e-12)

    loss.backward()
    assert start.grad is None  # the first step's predictions are inputs, not trained through this loss
    assert model.scale.grad is not None and model.scale.grad.abs() > 0
