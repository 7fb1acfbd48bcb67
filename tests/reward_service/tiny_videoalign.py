"""A tiny random VideoAlign checkpoint written in the published on-disk layout, offline.

The reference reward model is built the way the published one was trained: a Qwen2-VL with a
bias-free `rm_head`, wrapped by PEFT with LoRA on every language-model Linear. Its tensors are
saved under the transformers-4.45 key names (`visual.*`, `model.layers.*`) that the published files
use, as `model.pth` (full) or `adapter_model.safetensors` + `non_lora_state_dict.pth` (LoRA).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
REWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]

# The Qwen2-VL-Instruct chat template (as shipped with its tokenizer).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(with_reward_tokens: bool):
    """Byte-level BPE (as Qwen's) trained on the scoring instruction, plus the Qwen2-VL special tokens.

    A few hundred merges keep the instruction a few hundred tokens long, so the tiny model is quick.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from reward_service.videoalign_inputs import VIDEOALIGN_PROMPT

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, special_tokens=SPECIALS
    )
    core.train_from_iterator([VIDEOALIGN_PROMPT] * 3, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:]
    )
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    if with_reward_tokens:
        tok.add_tokens(REWARD_TOKENS, special_tokens=True)
    return tok


def legacy_config_dict(tok) -> dict:
    """config.json in the flat format of the published Qwen2-VL-2B-Instruct, at a tiny size."""
    ids = tok.convert_tokens_to_ids(SPECIALS)
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": len(tok) + 5,  # the base vocabulary is padded, as Qwen's is
        "tie_word_embeddings": False,
        "bos_token_id": ids[0],
        "eos_token_id": ids[2],
        "vision_start_token_id": ids[3],
        "vision_end_token_id": ids[4],
        "image_token_id": ids[5],
        "video_token_id": ids[6],
        "vision_config": {
            "depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2,
            "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
    }


def to_legacy(key: str) -> str:
    """transformers-5 key -> the 4.45 key the published files use (PEFT prefix kept)."""
    prefix = "base_model.model." if key.startswith("base_model.model.") else ""
    k = key[len(prefix) :]
    if k.startswith("model.language_model."):
        k = "model." + k[len("model.language_model.") :]
    elif k.startswith("model.visual."):
        k = k[len("model.") :]
    return prefix + k


@dataclass
class TinyCheckpoint:
    root: Path  # the reward checkpoint directory (model_config.json, checkpoint-<step>/)
    base: Path  # the base Qwen2-VL directory
    reference: nn.Module  # PEFT-wrapped Qwen2VLForConditionalGeneration with .rm_head
    tokenizer: object


def write_tiny_checkpoint(
    tmp: Path, layout: str = "full", output_dim: int = 1, seed: int = 0, max_frame_pixels: int = 6272
) -> TinyCheckpoint:
    """Write base + reward directories under `tmp`; layout "full" (model.pth) or "lora"."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    base, root = tmp / "Qwen2-VL-tiny", tmp / "VideoReward"
    ckpt = root / "checkpoint-7"
    for d in (base, ckpt / "tokenizer"):
        d.mkdir(parents=True)
    base_tok, reward_tok = tiny_tokenizer(False), tiny_tokenizer(True)
    base_tok.save_pretrained(base)
    reward_tok.save_pretrained(ckpt / "tokenizer")
    (base / "config.json").write_text(json.dumps(legacy_config_dict(base_tok), indent=2))
    (base / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))

    torch.manual_seed(seed)
    config = Qwen2VLConfig.from_pretrained(base)
    model = Qwen2VLForConditionalGeneration(config).float().eval()
    save_file({to_legacy(k): v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    model.resize_token_embeddings(len(reward_tok))  # as training did: the padded base vocabulary shrinks
    with torch.no_grad():  # the vision tower was fully trained: differ from the base weights
        for p in model.model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.rm_head = nn.Linear(config.text_config.hidden_size, output_dim, bias=False)
    targets = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(x in name for x in ("lm_head", "rm_head", "embed_tokens", "visual"))
    ]
    lora_r, lora_alpha = 4, 8
    peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    peft_model.eval()

    if layout == "full":
        torch.save({to_legacy(k): v for k, v in peft_model.state_dict().items()}, ckpt / "model.pth")
    elif layout == "lora":
        adapter = get_peft_model_state_dict(peft_model)
        save_file({to_legacy(k): v.contiguous() for k, v in adapter.items()}, str(ckpt / "adapter_model.safetensors"))
        trained = {
            to_legacy(k): v.detach().clone() for k, v in peft_model.named_parameters()
            if "lora_" not in k and (".visual." in k or "rm_head" in k or "embed_tokens" in k)
        }
        torch.save(trained, ckpt / "non_lora_state_dict.pth")
    else:
        raise ValueError(layout)

    (root / "model_config.json").write_text(json.dumps({
        "data_config": {
            "max_frame_pixels": max_frame_pixels, "num_frames": None, "fps": 2.0, "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special", "sample_type": "uniform",
        },
        "training_args": {"output_dir": "unused"},
        "model_config": {
            "model_name_or_path": str(base), "output_dim": output_dim, "use_special_tokens": True,
            "reward_token": "special", "torch_dtype": "bfloat16",
        },
        "peft_lora_config": {
            "lora_enable": True, "vision_lora": False, "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": 0.0,
            "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"], "use_rslora": False,
        },
        "inference_config": {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 3.0, "TA_std": 4.0},
    }, indent=2))
    return TinyCheckpoint(root=root, base=base, reference=peft_model, tokenizer=reward_tok)
