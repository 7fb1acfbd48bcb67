"""VideoReward on transformers 5.x: one test per known trap (peers hit each of them), on a tiny
checkpoint in the published layout.

1. The vision tower now returns an output object whose `last_hidden_state` holds the *unmerged*
   patch features (vision width, 4x the rows); the video tokens must get `pooler_output`, the
   features after the 2x2 patch merger (text width).
2. Qwen2-VL's key layout moved: 4.45 `visual.*` / `model.*` -> 5.x `model.visual.*` /
   `model.language_model.*`. Checkpoints exist in both; both must load to the same model.
3. `use_cache` now defaults to the config's (True): a scoring forward must not build a KV cache.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from reward_service.base import Video
from reward_service.videoalign import VideoAlignReward
from reward_service.videoalign_checkpoint import backbone_key
from tiny_videoalign import write_tiny_checkpoint

PROMPTS = ["a red ball", "two cats dancing in the rain"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), layout="full", output_dim=1, seed=4)


@pytest.fixture(scope="module")
def model(ckpt):
    return VideoAlignReward(ckpt.root, min_frame_pixels=3136)


def _videos() -> list[Video]:
    rng = np.random.default_rng(1)
    return [Video(rng.integers(0, 256, (9, 50, 70, 3), dtype=np.uint8), 8.0), Video(rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8), 4.0)]


def _capture_language_model_calls(model):
    calls = []
    hook = model.backbone.language_model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output)), with_kwargs=True
    )
    return calls, hook


def test_video_tokens_get_the_merged_pooler_output_not_the_patch_features(model):
    video, prompt = _videos()[0], PROMPTS[0]
    calls, hook = _capture_language_model_calls(model)
    try:
        scores = model.score([video], [prompt])
    finally:
        hook.remove()
    ((kwargs, _),) = calls
    inputs = model.model_inputs([video], [prompt])
    ids = inputs["input_ids"][0]
    at_video = ids == model.video_token_id
    with torch.no_grad():
        vision = model.backbone.visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
    hidden = model.backbone.config.text_config.hidden_size
    # The trap: last_hidden_state is the unmerged patch grid, 4x the video tokens, at the vision width.
    assert vision.last_hidden_state.shape == (4 * int(at_video.sum()), model.backbone.config.vision_config.embed_dim)
    assert vision.pooler_output.shape == (int(at_video.sum()), hidden)
    torch.testing.assert_close(kwargs["inputs_embeds"][0][at_video], vision.pooler_output, rtol=0, atol=0)

    # The whole score, recomputed by hand from the pieces: token embeddings with the merged video
    # features scattered in, the text decoder at sequential positions, rm_head at each reward token.
    with torch.no_grad():
        embeds = model.backbone.language_model.embed_tokens(ids).clone()
        embeds[at_video] = vision.pooler_output
        positions = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
        states = model.backbone.language_model(inputs_embeds=embeds[None], position_ids=positions, use_cache=False).last_hidden_state[0]
    for head, token_id in zip(("VQ", "MQ", "TA"), model.reward_token_ids):
        (where,) = (ids == token_id).nonzero()[:, 0].tolist()
        assert scores[head][0] == pytest.approx(float(states[where] @ model.head.weight[0]), rel=1e-5, abs=1e-6)


def _to_v5_key(key: str) -> str:
    """A 4.45-layout key of the published files -> the transformers 5.x layout (PEFT prefix kept)."""
    prefix = "base_model.model."
    k = key.removeprefix(prefix)
    if k.startswith("visual."):
        k = "model." + k
    elif k.startswith("model."):
        k = "model.language_model." + k.removeprefix("model.")
    return prefix + k


def test_the_transformers5_key_layout_loads_to_the_same_scores(ckpt, model, tmp_path):
    assert backbone_key("base_model.model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert backbone_key("base_model.model.model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert backbone_key("model.layers.1.mlp.up_proj.weight") == "language_model.layers.1.mlp.up_proj.weight"
    assert backbone_key("model.language_model.layers.1.mlp.up_proj.weight") == "language_model.layers.1.mlp.up_proj.weight"
    assert backbone_key("lm_head.weight") is None
    with pytest.raises(ValueError, match="unexpected VideoAlign checkpoint key 'vision_tower.x'"):
        backbone_key("vision_tower.x")

    root = tmp_path / "VideoReward-v5"
    shutil.copytree(ckpt.root, root)
    path = next(root.glob("checkpoint-*")) / "model.pth"
    legacy = torch.load(path, weights_only=True)
    v5 = {_to_v5_key(k): v for k, v in legacy.items()}
    assert any(k.startswith("base_model.model.model.language_model.layers.") for k in v5)
    assert any(k.startswith("base_model.model.model.visual.") for k in v5)
    assert not any(k.startswith(("base_model.model.visual.", "base_model.model.model.layers.")) for k in v5)
    torch.save(v5, path)

    videos = _videos()
    want = model.score(videos, PROMPTS)
    got = VideoAlignReward(root, min_frame_pixels=3136).score(videos, PROMPTS)
    for head in ("VQ", "MQ", "TA"):
        np.testing.assert_array_equal(got[head], want[head])


def test_scoring_builds_no_kv_cache(model):
    # The config asks for a cache, so only an explicit use_cache=False keeps scoring from building one.
    assert model.backbone.language_model.config.use_cache is True
    calls, hook = _capture_language_model_calls(model)
    try:
        model.score(_videos(), PROMPTS)
    finally:
        hook.remove()
    assert calls
    for kwargs, output in calls:
        assert kwargs.get("use_cache") is False
        assert output.past_key_values is None
