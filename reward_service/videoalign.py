"""VideoAlign (VideoReward, KwaiVGI/VideoAlign): Qwen2-VL scoring a video's VQ, MQ and TA.

The reward model is Qwen2-VL (2B in the published checkpoint) whose instruction contains three
reward tokens; a bias-free linear head `rm_head` [output_dim, hidden] reads the last hidden state
at each of them:

    h_k = last hidden state at <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|>     (k = 0, 1, 2)
    score_k = rm_head.weight[0] . h_k          (output_dim 1: one row shared by the tokens)
    score_k = rm_head.weight[k] . h_k          (output_dim 3: row k for token k)
    normalised (optional): (score_k - mean_k) / std_k   with inference_config's means/stds

As in the published code, the language model runs with plain sequential positions
(0..L-1 in all three M-RoPE sections), not Qwen2-VL's 3-D vision positions: its reward forward
called the text decoder directly with no position ids. Overall = VQ + MQ + TA is left to the
multi-reward layer.

Precision as trained: the published checkpoint ran under transformers 4.45 after `.to(bfloat16)`,
so its rotary embeddings used bf16-rounded frequencies (and bf16 vision angles), and its head ran
in bf16. `rotary_precision="bf16_trained"` (default) reproduces those rotary numbers
(videoalign_rotary.py) whatever the model dtype; `head_dtype="model"` (default) runs the head in
the backbone's dtype as upstream (bf16 on CUDA rounds each score to bf16: steps of 1/32 at 4..8).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reward_service.base import RewardModel, Video
from reward_service.videoalign_checkpoint import (
    HEAD_KEY,
    find_checkpoint,
    read_model_config,
    reward_state_dict,
)
from reward_service.videoalign_inputs import (
    CLIP_MEAN,
    CLIP_STD,
    REWARD_TOKENS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOKEN,
    FramePolicy,
    chat_text,
    video_patches,
)
from reward_service.videoalign_rotary import ROTARY_PRECISIONS, apply_rotary_precision

log = logging.getLogger(__name__)
HEADS = ("VQ", "MQ", "TA")


class VideoAlignReward(RewardModel):
    """VideoAlign loaded from a checkpoint directory in its published layout.

    checkpoint_dir: holds model_config.json and checkpoint-<step>/ (see videoalign_checkpoint.py).
    base_model_dir: a local Qwen2-VL directory (config.json, preprocessor_config.json, tokenizer,
        and the base weights when the checkpoint holds LoRA only); defaults to
        model_config.model_name_or_path when that is a local directory.
    normalize: report (x - mean) / std with the checkpoint's inference_config.
    dtype: "float32" | "bfloat16" | "float16" (default bfloat16 on CUDA, float32 on CPU).
    fps / num_frames / max_frame_pixels default to the checkpoint's data_config;
    min_frame_pixels to 128*28*28 as in the published code.
    rotary_precision: "bf16_trained" (the rotary numbers the checkpoint was trained with) | "float32"
        (transformers 5's own). head_dtype: "model" (the backbone's dtype, as upstream) | "float32".
    """

    name = "videoalign"
    heads = HEADS

    def __init__(
        self,
        checkpoint_dir: str | Path,
        base_model_dir: str | Path | None = None,
        checkpoint_step: int | None = None,
        normalize: bool = False,
        device: str | None = None,
        dtype: str | None = None,
        micro_batch_size: int = 2,
        fps: float | None = None,
        num_frames: int | None = None,
        min_frame_pixels: int = VIDEO_MIN_PIXELS,
        max_frame_pixels: int | None = None,
        attn_implementation: str = "sdpa",
        rotary_precision: str = "bf16_trained",
        head_dtype: str = "model",
    ) -> None:
        from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel
        from transformers.initialization import no_init_weights

        if rotary_precision not in ROTARY_PRECISIONS:
            raise ValueError(f"rotary_precision must be one of {ROTARY_PRECISIONS}, got {rotary_precision!r}")
        if head_dtype not in ("model", "float32"):
            raise ValueError(f"head_dtype must be 'model' or 'float32', got {head_dtype!r}")
        checkpoint_dir = Path(checkpoint_dir)
        self.config = read_model_config(checkpoint_dir)
        ckpt = find_checkpoint(checkpoint_dir, checkpoint_step)
        base_dir = _resolve_base_dir(base_model_dir, self.config.base_model)
        if normalize and self.config.norm is None:
            raise ValueError(f"normalize=True needs inference_config means/stds in {checkpoint_dir}/model_config.json")
        self.normalize = normalize
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.micro_batch_size = micro_batch_size

        qwen_config = Qwen2VLConfig.from_pretrained(base_dir)
        tokenizer_dir = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else base_dir
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        missing = [t for t in REWARD_TOKENS if t not in self.tokenizer.get_vocab()]
        if missing:  # the published tokenizer has them; a base tokenizer gets them appended, as in training
            self.tokenizer.add_tokens(missing, special_tokens=True)
        self.reward_token_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in REWARD_TOKENS]
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        if self.video_token_id != qwen_config.video_token_id:
            raise ValueError(
                f"tokenizer in {tokenizer_dir} maps {VIDEO_TOKEN} to {self.video_token_id}, "
                f"but config.json video_token_id is {qwen_config.video_token_id}"
            )

        state = reward_state_dict(ckpt, self.config, base_dir)
        head = state.pop(HEAD_KEY, None)
        hidden = qwen_config.text_config.hidden_size
        if head is None:
            raise KeyError(f"{ckpt} has no reward head {HEAD_KEY!r}")
        if tuple(head.shape) != (self.config.output_dim, hidden):
            raise ValueError(
                f"{HEAD_KEY} in {ckpt} has shape {tuple(head.shape)}, expected "
                f"(model_config.output_dim={self.config.output_dim}, hidden_size={hidden})"
            )
        embed = state.get("language_model.embed_tokens.weight")
        if embed is None:
            raise KeyError(f"{ckpt}: no token embedding (model.embed_tokens.weight) in the checkpoint")
        if max(self.reward_token_ids) >= embed.shape[0]:
            raise ValueError(f"reward token ids {self.reward_token_ids} exceed the checkpoint's {embed.shape[0]} embeddings")
        qwen_config.text_config.vocab_size = embed.shape[0]

        with no_init_weights(), torch.device(self.device):
            self.backbone = Qwen2VLModel._from_config(qwen_config, dtype=self.dtype, attn_implementation=attn_implementation)
        missing_keys, unexpected = self.backbone.load_state_dict(state, strict=False)
        if missing_keys or unexpected:
            raise KeyError(
                f"{ckpt} does not match the Qwen2-VL config in {base_dir}: "
                f"missing {sorted(missing_keys)[:8]}{'...' if len(missing_keys) > 8 else ''}, "
                f"unexpected {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        self.backbone.eval().requires_grad_(False)
        self.rotary_precision = rotary_precision
        apply_rotary_precision(self.backbone, rotary_precision)
        self.head_dtype = self.dtype if head_dtype == "model" else torch.float32
        self.head = nn.Linear(hidden, self.config.output_dim, bias=False, device=self.device, dtype=self.head_dtype)
        self.head.weight.data.copy_(head.to(self.head_dtype))
        self.head.requires_grad_(False)

        vision = qwen_config.vision_config
        self.frames = FramePolicy(
            fps=fps if fps is not None else (self.config.fps if num_frames is None else None),
            num_frames=num_frames if num_frames is not None else self.config.num_frames,
            min_pixels=min_frame_pixels,
            max_pixels=max_frame_pixels or self.config.max_frame_pixels,
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            **_processor_mean_std(base_dir),
        )
        log.info("VideoAlign loaded from %s (base %s) on %s/%s, rotary %s, head %s", ckpt, base_dir, self.device,
                 self.dtype, rotary_precision, self.head_dtype)

    def score(self, videos: list[Video], prompts: list[str]) -> dict[str, np.ndarray]:
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        rows = []
        for start in range(0, len(videos), self.micro_batch_size):
            rows.append(self.raw_scores(videos[start : start + self.micro_batch_size], prompts[start : start + self.micro_batch_size]))
        raw = torch.cat(rows).double().cpu().numpy() if rows else np.zeros((0, 3))
        out = {}
        for k, head in enumerate(HEADS):
            values = raw[:, k]
            if self.normalize:
                mean, std = self.config.norm[head]
                values = (values - mean) / std
            out[head] = values
        return out

    def model_inputs(self, videos: list[Video], prompts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (right padding), pixel_values_videos, video_grid_thw."""
        ids, patches, grids = [], [], []
        for video, prompt in zip(videos, prompts):
            pixels, grid = video_patches(video.frames, video.fps, self.frames, self.device)
            tokens = grid[0] * grid[1] * grid[2] // self.frames.merge_size**2
            text = chat_text(prompt, self.tokenizer).replace(VIDEO_TOKEN, VIDEO_TOKEN * tokens)
            ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            patches.append(pixels)
            grids.append(grid)
        length = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            attention_mask[i, : len(x)] = 1
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "pixel_values_videos": torch.cat(patches).to(self.dtype),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long, device=self.device),
        }

    @torch.no_grad()
    def raw_scores(self, videos: list[Video], prompts: list[str]) -> torch.Tensor:
        """Unnormalised [B, 3] scores (VQ, MQ, TA)."""
        inputs = self.model_inputs(videos, prompts)
        input_ids = inputs["input_ids"]
        b, length = input_ids.shape
        positions = torch.arange(length, device=self.device).view(1, 1, -1).expand(3, b, -1)
        # use_cache=False: transformers 5 defaults it to config.use_cache (True), which would build a
        # KV cache of the whole sequence on every scoring forward only to discard it.
        hidden = self.backbone(**inputs, position_ids=positions, use_cache=False).last_hidden_state
        rows = []
        for k, token_id in enumerate(self.reward_token_ids):
            where = input_ids == token_id
            counts = where.sum(dim=1)
            if not bool((counts == 1).all()):
                raise ValueError(f"each sample must hold {REWARD_TOKENS[k]} exactly once, got counts {counts.tolist()}")
            h_k = hidden[where].to(self.head_dtype)  # [B, hidden], in sample order
            w_k = self.head.weight[0 if self.config.output_dim == 1 else k]
            rows.append((h_k @ w_k).float())
        return torch.stack(rows, dim=1)


def _resolve_base_dir(base_model_dir: str | Path | None, from_config: str) -> Path:
    candidate = Path(base_model_dir) if base_model_dir else Path(from_config) if from_config else None
    if candidate is None or not candidate.is_dir():
        raise FileNotFoundError(
            f"base Qwen2-VL directory not found ({candidate}): pass base_model_dir= a local copy of "
            f"{from_config or 'the base model'} (config.json, preprocessor_config.json, tokenizer)"
        )
    if not (candidate / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {candidate} has no config.json")
    return candidate


def _processor_mean_std(base_dir: Path) -> dict:
    """Pixel mean/std from the base processor config (Qwen2-VL uses CLIP's)."""
    import json

    path = base_dir / "preprocessor_config.json"
    if not path.is_file():
        return {"mean": CLIP_MEAN, "std": CLIP_STD}
    raw = json.loads(path.read_text())
    return {"mean": tuple(raw.get("image_mean", CLIP_MEAN)), "std": tuple(raw.get("image_std", CLIP_STD))}
