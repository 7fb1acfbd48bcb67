"""VideoReward's rotary embeddings as the checkpoint was trained (transformers 4.45 after `.to(bfloat16)`).

The expected numbers are computed here from transformers 4.45's Qwen2-VL formulas, written out:
  text    Qwen2VLRotaryEmbedding: inv_freq = 1 / theta^(arange(0, d, 2) / d), a buffer that
          `.to(bfloat16)` rounds; freqs = inv_freq.float() @ positions.float() (autocast off);
          emb = cat(freqs, freqs); cos/sin in float32, cast to the activations' dtype;
          apply_multimodal_rotary_pos_emb picks section i of (mrope_section * 2) from row i % 3.
  vision  VisionRotaryEmbedding(d' = head_dim / 2): the same inv_freq rounded to bf16;
          seq = arange(max_grid, dtype=inv_freq.dtype) (bf16); freqs = outer(seq, inv_freq) (bf16);
          rot_pos_emb = freqs[pos_ids].flatten(1) with pos_ids the (h, w) of each patch in 2x2
          merge-block order; apply_rotary_pos_emb_vision: cos = freqs.cos() (bf16) .float(),
          repeated twice along the last dimension.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_videoalign import write_tiny_checkpoint
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, Qwen2VLVisionRotaryEmbedding

from reward_service.base import Video
from reward_service.videoalign import VideoAlignReward
from reward_service.videoalign_rotary import apply_rotary_precision

PROMPTS = ["a red ball", "two cats dancing in the rain"]


def legacy_text_cos_sin(theta, dim, mrope_section, position_ids, out_dtype):
    """transformers 4.45 text rotary of a bf16 model; position_ids [3, B, L] -> cos, sin [B, L, dim]."""
    inv_freq = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))).to(torch.bfloat16)
    b = position_ids.shape[1]
    inv_expanded = inv_freq[None, None, :, None].float().expand(3, b, -1, 1)
    freqs = (inv_expanded @ position_ids[:, :, None, :].float()).transpose(2, 3)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(out_dtype), emb.sin().to(out_dtype)
    sections = list(mrope_section) * 2
    pick = lambda t: torch.cat([m[i % 3] for i, m in enumerate(t.split(sections, dim=-1))], dim=-1)  # noqa: E731
    return pick(cos), pick(sin)


def legacy_vision_pos_ids(grid_thw, merge: int) -> torch.Tensor:
    """4.45 Qwen2VisionTransformerPretrainedModel.rot_pos_emb's pos_ids: [N, 2] (h, w)."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).unsqueeze(1).expand(-1, w).reshape(h // merge, merge, w // merge, merge)
        wpos = torch.arange(w).unsqueeze(0).expand(h, -1).reshape(h // merge, merge, w // merge, merge)
        hw = torch.stack([hpos.permute(0, 2, 1, 3).flatten(), wpos.permute(0, 2, 1, 3).flatten()], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def legacy_vision_cos_sin(theta, head_dim, pos_ids, max_grid):
    dim = head_dim // 2
    inv_freq = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).to(torch.bfloat16)
    seq = torch.arange(max_grid, dtype=inv_freq.dtype)
    freqs = torch.outer(seq, inv_freq)[pos_ids].flatten(1)  # bf16 [N, dim]
    return freqs.cos().float().repeat(1, 2), freqs.sin().float().repeat(1, 2)


def test_text_rotary_reproduces_the_trained_bf16_numbers_at_real_size():
    # Qwen2-VL-2B's text rotary: theta 1e6, head dim 128, M-RoPE sections (16, 24, 24).
    config = Qwen2VLTextConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    rotary = Qwen2VLRotaryEmbedding(config)
    length = 2100
    seq = torch.arange(length)
    position_ids = torch.stack([seq, seq // 3, seq % 7 + 5])[:, None, :]  # three distinct rows check the sections
    for dtype in (torch.bfloat16, torch.float32):
        want_cos, want_sin = legacy_text_cos_sin(1e6, 128, (16, 24, 24), position_ids, dtype)
        apply_rotary_precision(rotary, "bf16_trained")
        cos, sin = rotary(torch.zeros(1, dtype=dtype), position_ids)
        assert cos.dtype == dtype and cos.shape == (1, length, 128)
        torch.testing.assert_close(cos, want_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, want_sin, rtol=0, atol=0)
        apply_rotary_precision(rotary, "float32")  # transformers 5's own numbers: far off at these distances
        cos32, _ = rotary(torch.zeros(1, dtype=dtype), position_ids)
        assert (cos32[0, :1000].float() - want_cos[0, :1000].float()).abs().max() > 0.5
        assert (cos32[0, :200].float() - want_cos[0, :200].float()).abs().max() > 0.01


def test_vision_rotary_reproduces_the_trained_bf16_numbers_at_real_size():
    # Qwen2-VL-2B's vision tower: embed 1280, 16 heads (head dim 80), theta 1e4; a 480p frame pair.
    rotary = Qwen2VLVisionRotaryEmbedding(Qwen2VLVisionConfig(embed_dim=1280, num_heads=16))
    grid = torch.tensor([[2, 24, 42]])
    pos_ids = legacy_vision_pos_ids(grid, merge=2)
    want_cos, want_sin = legacy_vision_cos_sin(10000.0, 80, pos_ids, max_grid=42)
    apply_rotary_precision(rotary, "bf16_trained")
    cos, sin = rotary(torch.zeros(1), pos_ids)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=0)
    apply_rotary_precision(rotary, "float32")
    cos32, _ = rotary(torch.zeros(1), pos_ids)
    assert (cos32 - want_cos).abs().max() > 1e-2


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("rotary"), layout="full", output_dim=1, seed=0)


def _videos() -> list[Video]:
    rng = np.random.default_rng(0)
    return [
        Video(rng.integers(0, 256, (9, 50, 70, 3), dtype=np.uint8), 8.0),
        Video(rng.integers(0, 256, (12, 64, 48, 3), dtype=np.uint8), 4.0),
    ]


def _legacy_reference_scores(ckpt, model: VideoAlignReward, videos, prompts) -> np.ndarray:
    """The PEFT-wrapped source model, each sample alone, with its rotary outputs replaced by the 4.45
    numbers above (forward hooks, not the module under test); the vision positions the tower passes in
    are checked against 4.45's rot_pos_emb recipe on the way."""
    inner = ckpt.reference.base_model.model
    text_cfg, vision_cfg = inner.config.text_config, inner.config.vision_config
    text_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    theta, sections = text_cfg.rope_parameters["rope_theta"], text_cfg.rope_parameters["mrope_section"]
    grid = {}

    def text_hook(module, args, output):
        x, position_ids = args
        return legacy_text_cos_sin(theta, text_dim, sections, position_ids.expand(3, -1, -1), x.dtype)

    def vision_hook(module, args, output):
        _, pos_ids = args
        assert torch.equal(pos_ids, legacy_vision_pos_ids(grid["thw"], vision_cfg.spatial_merge_size))
        head_dim = vision_cfg.embed_dim // vision_cfg.num_heads
        return legacy_vision_cos_sin(vision_cfg.rope_parameters["rope_theta"], head_dim, pos_ids, int(grid["thw"][:, 1:].max()))

    handles = [inner.model.language_model.rotary_emb.register_forward_hook(text_hook),
               inner.model.visual.rotary_pos_emb.register_forward_hook(vision_hook)]
    head, out = inner.rm_head.weight, []
    try:
        with torch.no_grad():
            for video, prompt in zip(videos, prompts):
                inputs = model.model_inputs([video], [prompt])
                grid["thw"] = inputs["video_grid_thw"]
                ids = inputs["input_ids"][0]
                pos = torch.arange(ids.shape[0]).view(1, 1, -1).expand(3, 1, -1)
                hidden = inner.model(**inputs, position_ids=pos).last_hidden_state[0]
                row = []
                for token in ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"):
                    (at,) = (ids == ckpt.tokenizer.convert_tokens_to_ids(token)).nonzero()[:, 0].tolist()
                    row.append(float(hidden[at] @ head[0]))
                out.append(row)
    finally:
        for handle in handles:
            handle.remove()
    return np.array(out)


def test_scores_follow_the_trained_rotary_by_default_and_differ_on_the_float32_path(full_ckpt):
    videos = _videos()
    trained = VideoAlignReward(full_ckpt.root, min_frame_pixels=3136)  # rotary_precision="bf16_trained"
    got = np.stack([v for v in trained.score(videos, PROMPTS).values()], axis=1)
    expected = _legacy_reference_scores(full_ckpt, trained, videos, PROMPTS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    float32 = VideoAlignReward(full_ckpt.root, min_frame_pixels=3136, rotary_precision="float32")
    other = np.stack([v for v in float32.score(videos, PROMPTS).values()], axis=1)
    assert np.abs(other - expected).max() > 1e-3  # the float32 path does not reproduce the trained numbers


def test_bad_precision_options_are_named(full_ckpt):
    with pytest.raises(ValueError, match="rotary_precision must be one of"):
        VideoAlignReward(full_ckpt.root, rotary_precision="bf16")
    with pytest.raises(ValueError, match="head_dtype must be"):
        VideoAlignReward(full_ckpt.root, head_dtype="half")


def test_head_runs_in_the_models_dtype_as_upstream(full_ckpt):
    videos = _videos()[:1]
    bf16 = VideoAlignReward(full_ckpt.root, min_frame_pixels=3136, dtype="bfloat16")
    assert bf16.head.weight.dtype == torch.bfloat16
    scores = np.array([v[0] for v in bf16.score(videos, PROMPTS[:1]).values()])
    as_bf16 = torch.tensor(scores).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(scores, as_bf16)  # each score is a bf16 value, as upstream's rm_head output
    wide = VideoAlignReward(full_ckpt.root, min_frame_pixels=3136, dtype="bfloat16", head_dtype="float32")
    wide_scores = np.array([v[0] for v in wide.score(videos, PROMPTS[:1]).values()])
    assert wide.head.weight.dtype == torch.float32
    assert np.abs(wide_scores - scores).max() < 0.02 and not np.array_equal(wide_scores, scores)
