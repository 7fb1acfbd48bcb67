"""Decoding a group in batches (rollout.decode_batch_size) gives the videos of one decode of all."""

from __future__ import annotations

import numpy as np
import torch

from pocket.preset import load_pocket_policy
from reward_service.result import RewardResult
from rollout_workers.produce import decode_and_score, decode_videos


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


def test_each_decoded_batch_is_sent_to_be_scored_before_the_next_is_decoded():
    """Streaming scoring: the reward pool gets a batch as soon as it is decoded, results come back in
    video order, and equal those of scoring the whole group at once."""
    policy = load_pocket_policy()
    latents = torch.randn(5, policy.num_chunks * policy.frames_per_chunk, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    events = []
    decode = policy.decode
    policy.decode = lambda x: events.append(("decode", len(x))) or decode(x)
    score = lambda videos: [RewardResult({"VQ": float(v.frames.astype(np.float64).mean())}, True) for v in videos]  # noqa: E731

    def submit(videos, prompts):
        events.append(("submit", len(videos)))
        return lambda: events.append(("fetch", len(videos))) or score(videos)

    results, decode_s, wait_s = decode_and_score(policy, latents, "a prompt", submit, batch_size=2)
    assert events == [("decode", 2), ("submit", 2), ("decode", 2), ("submit", 2), ("decode", 1), ("submit", 1),
                      ("fetch", 2), ("fetch", 2), ("fetch", 1)]
    whole = score(decode_videos(policy, latents, 2))
    assert [r.scores for r in results] == [r.scores for r in whole] and decode_s > 0 and wait_s >= 0
