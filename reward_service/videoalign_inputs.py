"""VideoAlign inputs: frame sampling, resizing, pixel patches and the prompt, as the model was trained.

Everything here reproduces the published VideoAlign preprocessing (KwaiVGI/VideoAlign, which follows
qwen-vl-utils and the Qwen2-VL image processor of transformers 4.45):

  frames    n = round_2( clip(T / fps_video * fps, 4, floor_2(min(768, T))) ), at most T;
            indices = round(linspace(0, T - 1, n))                        (round_2: nearest even)
  size      (h, w) = multiples of 28 closest to (H, W), scaled by sqrt to fit
            min_pixels <= h * w <= max_pixels (max_pixels = data_config.max_frame_pixels, 200704);
            bicubic resize with antialiasing, values rounded back to 0..255 as on uint8 frames
  pixels    x = (v / 255 - mean) / std with the CLIP mean/std of the Qwen2-VL processor
  patches   [grid_t * grid_h * grid_w, 3 * 2 * 14 * 14], grouped by 2x2 merge blocks;
            the text holds grid_t * grid_h * grid_w / 4 <|video_pad|> tokens
  text      the Qwen2-VL chat format around the "detailed_special" instruction with the three
            reward tokens <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|>
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_TOKEN = "<|video_pad|>"
IMAGE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
FRAME_FACTOR = 2
MIN_FRAMES = 4
MAX_FRAMES = 768
MAX_ASPECT_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The instruction the published checkpoints were trained with ("detailed_special"), verbatim: the
# reward heads read the hidden states at the three reward tokens, so the text must not change.
VIDEOALIGN_PROMPT = "\n".join(
    [
        "",
        "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.",
        "",
        "**Visual Quality:**  ",
        "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:",
        "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.",
        "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.",
        "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).",
        "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.",
        "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
        "",
        "Please provide the ratings of Visual Quality: <|VQ_reward|>",
        "END",
        "",
        "**Motion Quality:**  ",
        "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:",
        "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).",
        "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).",
        "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.",
        "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.",
        "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.",
        "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.",
        "",
        "Please provide the ratings of Motion Quality: <|MQ_reward|>",
        "END",
        "",
        "**Text Alignment:**  ",
        "Assess how well the video matches the textual prompt across the following sub-dimensions:",
        "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.",
        "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.",
        "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  ",
        "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.",
        "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.",
        "",
        "Textual prompt - {text_prompt}",
        "Please provide the ratings of Text Alignment: <|TA_reward|>",
        "END",
        "",
    ]
)

def instruction(prompt: str) -> str:
    """The scoring instruction for one generation prompt."""
    return VIDEOALIGN_PROMPT.replace("{text_prompt}", prompt)


def chat_text(prompt: str, tokenizer=None) -> str:
    """One user turn holding the video then the instruction, and the assistant's turn opened.

    Uses the tokenizer's chat template when it has one (the published tokenizer does); otherwise
    writes the Qwen2-VL-Instruct format directly.
    """
    text = instruction(prompt)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{VIDEO_TOKEN}<|vision_end|>{text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def sample_frame_indices(
    total_frames: int, video_fps: float, fps: float | None = 2.0, num_frames: int | None = None
) -> list[int]:
    """Indices of the frames the model sees: `fps` frames per second (or `num_frames` in all),
    an even count between 4 and 768, uniformly spread over the clip."""
    if num_frames is not None:
        n = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(MAX_FRAMES, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        n = min(max(total_frames / video_fps * fps, low), high)
        n = round(n / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, total_frames)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"VideoAlign needs at least {FRAME_FACTOR} frames to sample; the video has {total_frames}")
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def frame_size(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w): multiples of 28 near (height, width) with min_pixels <= h * w <= max_pixels."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of a {height}x{width} video exceeds {MAX_ASPECT_RATIO}")
    f = IMAGE_FACTOR
    h = max(f, round(height / f) * f)
    w = max(f, round(width / f) * f)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / f) * f, math.floor(width / beta / f) * f
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h, w


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> float [T, 3, h, w], bicubic with antialiasing, rounded to 0..255."""
    x = frames.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x.round().clamp(0, 255)


def patchify(
    pixels: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised [T, C, h, w] -> ([grid_t * grid_h * grid_w, C * tp * p * p], (grid_t, grid_h, grid_w)).

    Patches are ordered by time, then by merge block (row-major), then within the block, so each
    run of merge_size**2 patches is what the vision merger folds into one token. An odd frame count
    is padded by repeating the last frame.
    """
    t, c, h, w = pixels.shape
    if pad := -t % temporal_patch_size:
        pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    if gh % merge_size or gw % merge_size:
        raise ValueError(f"frame size {h}x{w} is not a multiple of {patch_size * merge_size}")
    x = pixels.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


@dataclass(frozen=True)
class FramePolicy:
    """How frames are picked and sized (from the checkpoint's data_config unless overridden)."""

    fps: float | None = 2.0
    num_frames: int | None = None
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = 200704
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def video_patches(
    frames: np.ndarray, video_fps: float, policy: FramePolicy, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 [T, H, W, 3] frames -> (float32 patches, grid (t, h, w)); see the module docstring."""
    idx = sample_frame_indices(frames.shape[0], video_fps, policy.fps, policy.num_frames)
    picked = torch.from_numpy(np.ascontiguousarray(frames[idx])).to(device).permute(0, 3, 1, 2)
    size = frame_size(frames.shape[1], frames.shape[2], policy.min_pixels, policy.max_pixels)
    x = resize_frames(picked, size) / 255.0
    mean = torch.tensor(policy.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(policy.std, device=x.device).view(1, 3, 1, 1)
    return patchify((x - mean) / std, policy.patch_size, policy.temporal_patch_size, policy.merge_size)
