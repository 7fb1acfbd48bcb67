"""Reading a VideoAlign checkpoint directory in its published layout.

    <checkpoint_dir>/model_config.json      data_config, model_config, peft_lora_config, inference_config
    <checkpoint_dir>/checkpoint-<step>/model.pth                       full state dict, or
    <checkpoint_dir>/checkpoint-<step>/adapter_model.safetensors       LoRA tensors +
    <checkpoint_dir>/checkpoint-<step>/non_lora_state_dict.pth         trained non-LoRA tensors
    <checkpoint_dir>/checkpoint-<step>/tokenizer/                      (optional) tokenizer with reward tokens

The tensors were saved from a PEFT-wrapped reward model built on transformers 4.45, whose Qwen2-VL
put the vision tower at `visual.*` and the language model at `model.*`. transformers 5 nests both
under `model.` (`model.visual.*`, `model.language_model.*`). `backbone_key` maps either layout onto
the keys of transformers 5's `Qwen2VLModel` (`visual.*`, `language_model.*`). LoRA pairs are merged
into their base weight, W <- W + s * B @ A with s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA),
since the reward model is only ever run for inference. `.pth` files load with weights_only=True.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

MODEL_CONFIG = "model_config.json"
FULL_WEIGHTS = "model.pth"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NON_LORA_WEIGHTS = "non_lora_state_dict.pth"
HEAD_KEY = "rm_head.weight"
_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class VideoAlignConfig:
    """The fields of model_config.json this loader uses."""

    base_model: str
    output_dim: int
    fps: float | None
    num_frames: int | None
    max_frame_pixels: int
    lora_r: int
    lora_alpha: float
    use_rslora: bool
    norm: dict[str, tuple[float, float]] | None  # head -> (mean, std)


def read_model_config(checkpoint_dir: Path) -> VideoAlignConfig:
    path = Path(checkpoint_dir) / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"VideoAlign checkpoint has no {MODEL_CONFIG}: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    sections = {}
    for name in ("data_config", "model_config", "peft_lora_config"):
        if not isinstance(raw.get(name), dict):
            raise ValueError(f"{path}: missing section {name!r}")
        sections[name] = raw[name]
    data, model, lora = sections["data_config"], sections["model_config"], sections["peft_lora_config"]
    if not model.get("use_special_tokens") or model.get("reward_token", "special") != "special":
        raise ValueError(
            f"{path}: model_config.use_special_tokens must be true and reward_token 'special' "
            f"(got {model.get('use_special_tokens')!r}, {model.get('reward_token')!r}); only the "
            "special-token reward model is supported"
        )
    if data.get("prompt_template_type", "detailed_special") != "detailed_special":
        raise ValueError(f"{path}: data_config.prompt_template_type must be 'detailed_special'")
    output_dim = int(model.get("output_dim", 1))
    if output_dim not in (1, 3):
        raise ValueError(f"{path}: model_config.output_dim must be 1 or 3, got {output_dim}")
    norm = None
    inference = raw.get("inference_config")
    if isinstance(inference, dict):
        try:
            norm = {h: (float(inference[f"{h}_mean"]), float(inference[f"{h}_std"])) for h in ("VQ", "MQ", "TA")}
        except KeyError as exc:
            raise ValueError(f"{path}: inference_config lacks {exc.args[0]!r}") from exc
    return VideoAlignConfig(
        base_model=str(model.get("model_name_or_path") or ""),
        output_dim=output_dim,
        fps=None if data.get("num_frames") is not None else float(data.get("fps", 2.0)),
        num_frames=None if data.get("num_frames") is None else int(data["num_frames"]),
        max_frame_pixels=int(data.get("max_frame_pixels", 200704)),
        lora_r=int(lora.get("lora_r", 16)) if lora.get("lora_enable") else 0,
        lora_alpha=float(lora.get("lora_alpha", 32)),
        use_rslora=bool(lora.get("use_rslora", False)),
        norm=norm,
    )


def find_checkpoint(checkpoint_dir: Path, step: int | None = None) -> Path:
    """`checkpoint-<step>` (the highest step if `step` is None)."""
    checkpoint_dir = Path(checkpoint_dir)
    found = {}
    for path in checkpoint_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            found[int(suffix)] = path
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> directory in {checkpoint_dir}")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"{checkpoint_dir} has no checkpoint-{step} (steps: {sorted(found)})")
    return found[step]


def backbone_key(key: str) -> str | None:
    """A reward-model key (4.45 or 5.x layout, PEFT-wrapped or not) -> Qwen2VLModel key, or
    `rm_head.weight`, or None for the unused language-model head."""
    k = key.removeprefix(_PEFT_PREFIX)
    if k.startswith("rm_head."):
        return k
    if k.startswith("lm_head."):
        return None
    for old, new in (("model.language_model.", "language_model."), ("model.visual.", "visual."), ("visual.", "visual."), ("model.", "language_model.")):
        if k.startswith(old):
            return new + k[len(old) :]
    raise ValueError(f"unexpected VideoAlign checkpoint key {key!r}")


def reward_state_dict(ckpt: Path, config: VideoAlignConfig, base_model_dir: Path | None) -> dict[str, torch.Tensor]:
    """Qwen2VLModel state dict with LoRA merged, plus `rm_head.weight`."""
    full, adapter, non_lora = ckpt / FULL_WEIGHTS, ckpt / ADAPTER_WEIGHTS, ckpt / NON_LORA_WEIGHTS
    if full.is_file():
        return _merge(_torch_load(full), {}, config)
    if adapter.is_file() and non_lora.is_file():
        if base_model_dir is None:
            raise FileNotFoundError(f"{ckpt} holds LoRA weights only: base_model_dir with the base Qwen2-VL weights is needed")
        base = _merge(_base_weights(base_model_dir), {}, config)
        return _merge(_torch_load(non_lora), load_file(str(adapter)), config, base)
    missing = [p.name for p in (adapter, non_lora) if not p.is_file()]
    raise FileNotFoundError(
        f"{ckpt} has no {FULL_WEIGHTS}, and lacks {' and '.join(missing)} for the LoRA layout "
        f"({ADAPTER_WEIGHTS} + {NON_LORA_WEIGHTS})"
    )


def _merge(
    tensors: dict[str, torch.Tensor],
    lora: dict[str, torch.Tensor],
    config: VideoAlignConfig,
    into: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Plain tensors renamed onto `into` (PEFT's base_layer / modules_to_save unwrapped), then each
    LoRA pair found in `tensors` or `lora` merged into its weight."""
    state = dict(into or {})
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for source in (tensors, lora):
        for key, value in source.items():
            match = _LORA.match(key)
            if match:
                pairs.setdefault(match["module"], {})[match["which"]] = value
                continue
            if "lora_" in key or ".original_module." in key:
                if ".original_module." in key:
                    continue  # superseded by modules_to_save
                raise ValueError(f"unsupported PEFT tensor {key!r} (only plain LoRA A/B pairs are merged)")
            key = key.replace(".base_layer.", ".")
            key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
            target = backbone_key(key)
            if target is not None:
                state[target] = value
    if pairs and config.lora_r <= 0:
        raise ValueError("checkpoint holds LoRA tensors but peft_lora_config.lora_enable is false")
    scale = config.lora_alpha / (math.sqrt(config.lora_r) if config.use_rslora else config.lora_r) if pairs else 0.0
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} lacks lora_{'B' if 'A' in pair else 'A'}")
        target = backbone_key(module + ".weight")
        if target not in state:
            raise KeyError(f"LoRA module {module!r} has no base weight {target!r} in the checkpoint")
        weight = state[target]
        delta = pair["B"].float() @ pair["A"].float()
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA of {module!r} gives {tuple(delta.shape)}, its weight is {tuple(weight.shape)}")
        state[target] = (weight.float() + scale * delta).to(weight.dtype)
    return state


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {path} as a tensor state dict (weights_only=True): {exc}") from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a flat dict of tensors")
    return obj


def _base_weights(base_model_dir: Path) -> dict[str, torch.Tensor]:
    base_model_dir = Path(base_model_dir)
    single = base_model_dir / "model.safetensors"
    index = base_model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(str(base_model_dir / shard)))
        return out
    raise FileNotFoundError(f"base model weights not found in {base_model_dir} (model.safetensors or its index)")
