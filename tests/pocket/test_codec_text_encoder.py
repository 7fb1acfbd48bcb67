"""The pocket codec (exact space-to-depth) and the fixed word-level text encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocket import domain
from pocket.codec import PocketCodec
from pocket.preset import fit_pocket_codec, pocket_text_encoder


@pytest.fixture(scope="module")
def codec():
    return fit_pocket_codec()


def test_codec_reconstructs_real_videos_closely_with_wan_geometry(codec):
    videos = domain.generate_batch(domain.heldout_prompts()[:6], range(6))
    latents = codec.encode(videos)
    assert latents.shape == (6, 8, 16, 8, 8) and latents.dtype == torch.float32
    assert abs(float(latents.std()) - codec.scale) < 0.5  # normalised like a VAE's latents, times the scale
    assert np.abs(codec.decode(latents).astype(int) - videos).mean() < 4.0


def test_codec_is_an_orthogonal_projection(codec):
    basis = codec.basis.double()
    assert torch.allclose(basis @ basis.T, torch.eye(basis.shape[0], dtype=torch.float64), atol=1e-5)
    z = torch.randn(2, 8, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = codec.to_pixels(z)  # latents -> pixels -> latents is the identity on the span
    coeffs = (codec.to_blocks(pixels) - codec.mean) @ codec.basis.T / codec.std * codec.scale
    assert torch.allclose(coeffs.reshape(2, 8, 2, 8, 8, 8).permute(0, 1, 2, 5, 3, 4).reshape(z.shape), z, atol=1e-4)


def test_codec_block_layout_matches_an_independent_fold(codec):
    video = np.random.default_rng(0).integers(0, 256, size=(1, 2, 8, 8, 3), dtype=np.uint8)
    blocks = codec.to_blocks(torch.from_numpy(video.astype(np.float32)))
    for t in range(2):
        for by in range(2):
            for bx in range(2):
                expected = video[0, t, 4 * by : 4 * by + 4, 4 * bx : 4 * bx + 4].reshape(-1)
                assert np.array_equal(blocks[0, t, by, bx].numpy(), expected.astype(np.float32))
    assert torch.equal(codec.from_blocks(blocks), torch.from_numpy(video.astype(np.float32)))


def test_codec_fit_is_deterministic_and_round_trips_through_its_file(codec, tmp_path):
    again = fit_pocket_codec()
    assert torch.equal(again.basis, codec.basis) and torch.equal(again.std, codec.std)
    codec.save(tmp_path)
    loaded = PocketCodec.load(tmp_path)
    assert torch.equal(loaded.basis, codec.basis) and torch.equal(loaded.mean, codec.mean) and loaded.scale == codec.scale
    with pytest.raises(FileNotFoundError, match="codec"):
        PocketCodec.load(tmp_path / "missing")


def test_decode_clips_out_of_range_latents(codec):
    assert set(np.unique(codec.decode(torch.full((1, 8, 16, 8, 8), 1e4)))) <= {0, 255}


def test_codec_rejects_bad_input(codec):
    with pytest.raises(ValueError, match="uint8"):
        codec.encode(np.zeros((1, 16, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(np.zeros((1, 15, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="latents must be"):
        codec.decode(torch.zeros(1, 8, 96, 8, 8))


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
