"""Decoding a group in batches (rollout.decode_batch_size) gives the videos of one decode of all."""

from __future__ import annotations

import numpy as np
import torch

from pocket.preset import load_pocket_policy
from rollout_workers.produce import decode_videos


def test_decoding_in_batches_equals_decoding_the_group_at_once():
    policy = load_pocket_policy()
    latents = torch.randn(5, policy.num_chunks * policy.frames_per_chunk, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    whole = decode_videos(policy, latents)
    for batch in (1, 2, 5):
        parts = decode_videos(policy, latents, batch)
        assert len(parts) == 5 and all(p.fps == policy.fps for p in parts)
        for a, b in zip(whole, parts):
            # the same decode up to float rounding in a batched convolution: at most one step of uint8
            assert a.frames.shape == b.frames.shape
            assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1
    assert any(not np.array_equal(whole[0].frames, w.frames) for w in whole[1:])  # distinct videos
