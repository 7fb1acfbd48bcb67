"""The pocket codec (exact space-to-depth) and the fixed word-level text encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy.pocket import domain
from policy.pocket.codec import PocketCodec
from policy.pocket.preset import pocket_codec, pocket_text_encoder


def test_codec_round_trip_is_exact_and_has_wan_geometry():
    codec = pocket_codec()
    videos = domain.generate_batch(domain.train_prompts()[:3], [0, 1, 2])
    latents = codec.encode(videos)
    assert latents.shape == (3, 8, 96, 8, 8) and latents.dtype == torch.float32
    assert np.array_equal(codec.decode(latents), videos)
    assert float(latents.abs().max()) <= codec.scale + 1e-6


def test_codec_layout_matches_an_independent_fold():
    codec = PocketCodec(time_stride=2, space_stride=4, scale=1.0)
    video = np.random.default_rng(0).integers(0, 256, size=(1, 4, 8, 8, 3), dtype=np.uint8)
    latents = codec.encode(video)[0]
    for f in range(2):
        for dt in range(2):
            for dy in range(4):
                for dx in range(4):
                    for c in range(3):
                        channel = ((dt * 4 + dy) * 4 + dx) * 3 + c
                        expected = video[0, 2 * f + dt, dy::4, dx::4, c] / 127.5 - 1.0
                        assert np.allclose(latents[f, channel].numpy(), expected, atol=1e-6)


def test_decode_clips_out_of_range_latents():
    codec = pocket_codec()
    latents = torch.full((1, 8, 96, 8, 8), 10.0)
    assert (codec.decode(latents) == 255).all()


def test_codec_rejects_bad_input():
    codec = pocket_codec()
    with pytest.raises(ValueError, match="uint8"):
        codec.encode(np.zeros((1, 16, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(np.zeros((1, 15, 32, 32, 3), dtype=np.uint8))


def test_text_encoder_is_fixed_zero_padded_and_strict():
    enc = pocket_text_encoder()
    prompts = ["a red circle moving left on a dark background", "two blue squares moving up on a light background"]
    out = enc.encode(prompts)
    assert out.shape == (2, enc.max_tokens, enc.dim)
    assert (out[0, 9:] == 0).all() and (out[0, :9] != 0).any(dim=1).all()
    assert torch.equal(out, pocket_text_encoder().encode(prompts))
    assert torch.equal(out[0, 1], out[1, 1]) is False  # "red" and "blue" differ
    assert torch.equal(out[0, 3], enc.encode(["two blue squares moving left on a grey background"])[0, 3])  # "moving"
    with pytest.raises(ValueError, match="purple"):
        enc.encode(["a purple circle moving left on a dark background"])
    assert enc.encoder_id == pocket_text_encoder().encoder_id
