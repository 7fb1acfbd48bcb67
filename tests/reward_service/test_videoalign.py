"""VideoAlign loads from the published checkpoint layout and scores like the model it was saved from."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from reward_service.base import Video
from reward_service.registry import build_reward
from reward_service.videoalign import VideoAlignReward
from reward_service.videoalign_inputs import chat_text, frame_size, patchify, sample_frame_indices
from tiny_videoalign import write_tiny_checkpoint

PROMPTS = ["a red ball", "two cats dancing in the rain"]


def _videos() -> list[Video]:
    rng = np.random.default_rng(0)
    return [
        Video(rng.integers(0, 256, (9, 50, 70, 3), dtype=np.uint8), 8.0),
        Video(rng.integers(0, 256, (12, 64, 48, 3), dtype=np.uint8), 4.0),
    ]


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("full"), layout="full", output_dim=1, seed=0)


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lora"), layout="lora", output_dim=3, seed=1)


def _reference_scores(ckpt, model: VideoAlignReward, videos, prompts) -> np.ndarray:
    """Each sample alone through the PEFT-wrapped source model (LoRA unmerged), read at the reward
    tokens with sequential positions: rm_head.weight[0 or k] . h_k. The source model keeps transformers 5's
    float32 rotary, so the loader is compared with rotary_precision="float32" (the trained bf16 rotary is
    tested in test_videoalign_rotary.py)."""
    peft_inner = ckpt.reference.base_model.model
    head = peft_inner.rm_head.weight
    out = []
    with torch.no_grad():
        for video, prompt in zip(videos, prompts):
            inputs = model.model_inputs([video], [prompt])
            ids = inputs["input_ids"][0]
            pos = torch.arange(ids.shape[0]).view(1, 1, -1).expand(3, 1, -1)
            hidden = peft_inner.model(**inputs, position_ids=pos).last_hidden_state[0]
            row = []
            for k, token in enumerate(["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]):
                (at,) = (ids == ckpt.tokenizer.convert_tokens_to_ids(token)).nonzero()[:, 0].tolist()
                row.append(float(hidden[at] @ head[0 if head.shape[0] == 1 else k]))
            out.append(row)
    return np.array(out)


def test_full_state_dict_layout_scores_match_the_source_model(full_ckpt):
    saved = torch.load(next(full_ckpt.root.glob("checkpoint-*")) / "model.pth", weights_only=True)
    assert any(k.startswith("base_model.model.visual.") for k in saved)  # the 4.45 key layout
    assert any(k.startswith("base_model.model.model.layers.") and "lora_A" in k for k in saved)

    model = build_reward("videoalign", checkpoint_dir=str(full_ckpt.root), min_frame_pixels=3136, rotary_precision="float32")
    videos = _videos()
    scores = model.score(videos, PROMPTS)  # one padded batch of two
    expected = _reference_scores(full_ckpt, model, videos, PROMPTS)
    for k, head in enumerate(("VQ", "MQ", "TA")):
        assert scores[head].dtype == np.float64 and scores[head].shape == (2,)
        np.testing.assert_allclose(scores[head], expected[:, k], rtol=1e-5, atol=1e-5)
    assert np.ptp(expected) > 1e-3  # the heads and samples really differ

    normalised = VideoAlignReward(full_ckpt.root, normalize=True, min_frame_pixels=3136, rotary_precision="float32").score(videos, PROMPTS)
    stats = json.loads((full_ckpt.root / "model_config.json").read_text())["inference_config"]
    for k, head in enumerate(("VQ", "MQ", "TA")):
        want = (expected[:, k] - stats[f"{head}_mean"]) / stats[f"{head}_std"]
        np.testing.assert_allclose(normalised[head], want, rtol=1e-5, atol=1e-5)


def test_lora_layout_with_base_weights_and_three_output_head(lora_ckpt):
    model = VideoAlignReward(lora_ckpt.root, min_frame_pixels=3136, rotary_precision="float32")
    videos = _videos()
    scores = model.score(videos, PROMPTS)
    expected = _reference_scores(lora_ckpt, model, videos, PROMPTS)
    got = np.stack([scores[h] for h in ("VQ", "MQ", "TA")], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_missing_weights_file_is_named(full_ckpt, tmp_path):
    root = tmp_path / "VideoReward"
    shutil.copytree(full_ckpt.root, root)
    (next(root.glob("checkpoint-*")) / "model.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.pth.*adapter_model\.safetensors and non_lora_state_dict\.pth"):
        VideoAlignReward(root, base_model_dir=full_ckpt.base)
    (root / "model_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model_config\.json"):
        VideoAlignReward(root, base_model_dir=full_ckpt.base)


def test_wrong_head_shape_is_named(full_ckpt, tmp_path):
    root = tmp_path / "VideoReward"
    shutil.copytree(full_ckpt.root, root)
    path = next(root.glob("checkpoint-*")) / "model.pth"
    state = torch.load(path, weights_only=True)
    state["base_model.model.rm_head.weight"] = torch.zeros(2, 64)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"rm_head\.weight.*\(2, 64\).*output_dim=1, hidden_size=64"):
        VideoAlignReward(root, base_model_dir=full_ckpt.base)


def test_missing_base_model_directory_is_named(full_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="base_model_dir"):
        VideoAlignReward(full_ckpt.root, base_model_dir=tmp_path / "nowhere")


def test_frame_sampling_follows_two_fps_with_an_even_count():
    # 33 frames at 16 fps: 33/16*2 = 4.1 -> 4 frames, spread over 0..32
    assert sample_frame_indices(33, 16.0, 2.0) == [0, 11, 21, 32]
    # 81 frames at 16 fps (a 5 s clip): 10.1 -> 10 frames
    assert sample_frame_indices(81, 16.0, 2.0) == [round(i * 80 / 9) for i in range(10)]
    # 5 s at 1 fps asks for 10, but the clip has 5 frames: at most floor_2(5) = 4
    assert sample_frame_indices(5, 1.0, 2.0) == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="at least 2 frames"):
        sample_frame_indices(1, 16.0, 2.0)


def test_frame_size_matches_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for h, w in [(480, 832), (720, 1280), (50, 70), (1080, 1920), (256, 256)]:
        mine = frame_size(h, w, 128 * 28 * 28, 200704)
        assert mine == smart_resize(h, w, factor=28, min_pixels=128 * 28 * 28, max_pixels=200704)
        assert mine[0] % 28 == 0 and mine[1] % 28 == 0 and mine[0] * mine[1] <= 200704
    assert frame_size(480, 832, 128 * 28 * 28, 200704) == (336, 588)


def test_patch_order_matches_the_qwen2vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = torch.randn(3, 56, 84)
    ours, grid = patchify(torch.stack([frame, frame]), patch_size=14, temporal_patch_size=2, merge_size=2)
    theirs, gh, gw = Qwen2VLImageProcessorPil().patchify(frame.numpy(), patch_size=14, merge_size=2, temporal_patch_size=2)
    assert grid == (1, gh, gw) == (1, 4, 6)
    np.testing.assert_array_equal(ours.numpy(), theirs)


def test_chat_text_without_template_equals_the_qwen2vl_template(full_ckpt):
    assert full_ckpt.tokenizer.chat_template
    assert chat_text("a dog", None) == chat_text("a dog", full_ckpt.tokenizer)
    assert all(chat_text("x", None).count(t) == 1 for t in ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"))
