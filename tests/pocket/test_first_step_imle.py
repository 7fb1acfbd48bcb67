"""The first step's IMLE objective and its real alternatives, against direct computations."""

from __future__ import annotations

import numpy as np
import torch

from policy.pocket import domain
from policy.pocket.distill import first_step_imle_loss
from policy.pocket.teacher import continuation_sets


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
