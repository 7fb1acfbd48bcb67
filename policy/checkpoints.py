"""Load the generators' released transformer weights into a diffusers-named Wan transformer.

Supported on-disk layouts (``kind``):

- ``"self_forcing"``: a ``torch.save`` dict ``{"generator", "critic", "generator_ema"}`` whose entries are
  state dicts in the original Wan names, prefixed ``model.`` (the generator wrapper) and sometimes
  ``model._fsdp_wrapped_module.``. ``generator_ema`` is used, ``generator`` when there is no EMA.
- ``"causal_forcing"``: the same layout; Causal-Forcing's files hold exactly one of ``generator``
  (chunk-wise) or ``generator_ema`` (frame-wise, keys usually ``model._fsdp_wrapped_module.``).
  Causal-Forcing++ ``framewise-{2,1}step.pt`` load the same way (upstream runs them ``--use_ema``); their
  per-chunk step lists are the sampler's (``causal-forcing-pp-framewise-*`` presets), not the file's.
- ``"longlive"``: a base file like the above (``generator`` is what LongLive runs) plus ``lora.pt``,
  ``{"generator_lora": <PEFT state dict>, "critic_lora": ..., "step": int}``: a LoRA on every Linear of
  every block (rank from the tensors, alpha 256 by default) merged into the base weights here.
- ``"diffusers"``: a diffusers model directory (``config.json`` + ``diffusion_pytorch_model*.safetensors``,
  sharded or not, or a pipeline directory with ``transformer/``) or a single ``.safetensors`` file. A file
  in the original Wan names (e.g. Wan2.1's own ``diffusion_pytorch_model.safetensors``) is detected and
  converted.

Files are read with ``torch.load(weights_only=True)`` or safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

CHECKPOINT_KINDS = ("self_forcing", "causal_forcing", "longlive", "diffusers")

# Which entry of the saved dict each kind uses, first present wins.
GENERATOR_ENTRIES = {
    "self_forcing": ("generator_ema", "generator"),
    "causal_forcing": ("generator_ema", "generator"),
    # LongLive's released inference config sets use_ema: false.
    "longlive": ("generator", "generator_ema", "model"),
}
LONGLIVE_BASE_FILE = "longlive_base.pt"
LONGLIVE_LORA_FILE = "lora.pt"
LONGLIVE_LORA_ALPHA = 256.0

# Wrapper names inserted by FSDP, activation checkpointing and torch.compile.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Keys only the original Wan layout has.
_ORIGINAL_WAN_MARKERS = ("self_attn.", "cross_attn.", "head.head.", "time_embedding.")
_LIST_LIMIT = 40


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as the requested kind."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose keys or shapes do not match the model; lists every offending key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], shape_mismatches: list[str]):
        self.missing, self.unexpected, self.shape_mismatches = missing, unexpected, shape_mismatches
        parts = [f"checkpoint {source} does not match the model (keys as the model names them):"]
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shape_mismatches),
        ):
            if keys:
                shown = ", ".join(keys[:_LIST_LIMIT])
                more = f" ... and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else ""
                parts.append(f"  {len(keys)} {title}: {shown}{more}")
        super().__init__("\n".join(parts))


def torch_load_tensors(path: str | Path) -> dict:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``), memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # files written with the legacy (non-zip) serialisation
            if "mmap" not in str(error):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain containers; it is not unpickled "
            f"(weights_only=True). Re-save its state dicts as tensors (or safetensors) with a trusted "
            f"script first. Loader said: {error}"
        ) from error
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of state dicts")
    return dict(obj)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan names: drop the generator wrapper's ``model.`` and every FSDP/checkpoint wrapper segment."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        for segment in _WRAPPER_SEGMENTS:
            name = name.replace(segment, "")
        name = name.removeprefix("model.")
        if name in out:
            raise CheckpointError(f"two checkpoint keys map to the same parameter {name!r} (one is {key!r})")
        out[name] = value
    return out


def wan_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan transformer names -> diffusers ``WanTransformer3DModel`` names (norm2/norm3 swapped)."""
    # diffusers' converter pops from its argument: hand it a copy.
    return convert_wan_transformer_to_diffusers(dict(state_dict))


def is_original_wan_layout(keys) -> bool:
    return any(marker in key for key in keys for marker in _ORIGINAL_WAN_MARKERS)


def select_generator_state(checkpoint: Mapping, kind: str, source: str, entry: str | None = None) -> dict:
    """The generator's state dict out of a Self-Forcing-family training checkpoint."""
    entries = (entry,) if entry else GENERATOR_ENTRIES[kind]
    for name in entries:
        if name in checkpoint:
            state = checkpoint[name]
            if not isinstance(state, Mapping) or not state:
                raise CheckpointError(f"{source}: entry {name!r} is not a non-empty state dict")
            logger.info("%s: using entry %r", source, name)
            return dict(state)
    raise CheckpointError(
        f"{source} is not a {kind} checkpoint: none of the entries {list(entries)} is present "
        f"(top-level keys: {sorted(map(str, checkpoint))[:_LIST_LIMIT]})"
    )


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def merge_lora_into_state(
    base: dict[str, torch.Tensor],
    lora_state: Mapping[str, torch.Tensor],
    alpha: float,
    source: str,
) -> dict[str, torch.Tensor]:
    """``W += alpha / r * B @ A`` for every LoRA pair; ``lora_state`` keys in diffusers module names.

    Accepts PEFT's saved names (``<module>.lora_A.weight``) and live ones (``<module>.lora_A.<adapter>.weight``).
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in lora_state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            unexpected.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["which"]] = value
    problems = [f"{module}.lora_{'B' if 'A' in p else 'A'}.weight" for module, p in pairs.items() if len(p) != 2]
    missing_targets = [f"{module}.weight" for module in pairs if f"{module}.weight" not in base]
    shapes = []
    for module, p in pairs.items():
        weight = base.get(f"{module}.weight")
        if len(p) != 2 or weight is None:
            continue
        a, b = p["A"], p["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            shapes.append(f"{module}: A{tuple(a.shape)} B{tuple(b.shape)} vs weight{tuple(weight.shape)}")
    if unexpected or problems or missing_targets or shapes:
        raise CheckpointMismatchError(
            f"{source} (LoRA)", missing=problems + missing_targets, unexpected=unexpected, shape_mismatches=shapes
        )
    merged = dict(base)
    for module, p in pairs.items():
        weight = base[f"{module}.weight"]
        rank = p["A"].shape[0]
        delta = (p["B"].double() @ p["A"].double()) * (alpha / rank)
        # Kept at least fp32 so a bf16 base does not round the LoRA delta away before the model casts it.
        merged[f"{module}.weight"] = (weight.double() + delta).to(torch.promote_types(weight.dtype, torch.float32))
    logger.info("%s: merged %d LoRA pairs (alpha %.1f)", source, len(pairs), alpha)
    return merged


def read_longlive_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """LongLive's ``lora.pt`` generator LoRA, keys renamed to diffusers module names."""
    checkpoint = torch_load_tensors(path)
    state = checkpoint.get("generator_lora", checkpoint)
    if not isinstance(state, Mapping) or not any(".lora_" in str(k) for k in state):
        raise CheckpointError(f"{path} is not a LongLive LoRA file (no generator_lora entry with lora_A/lora_B keys)")
    stripped = {}
    for key, value in state.items():
        name = key
        for segment in _WRAPPER_SEGMENTS:
            name = name.replace(segment, "")
        name = name.removeprefix("base_model.model.").removeprefix("model.")
        stripped[name] = value
    return wan_to_diffusers(stripped)


def _read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "transformer").is_dir() and not (directory / "config.json").is_file():
        directory = directory / "transformer"
    index = sorted(directory.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(directory / shard, device="cpu"))
        return state
    files = sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(
            f"{directory}: expected one .safetensors file or a *.safetensors.index.json, found {[f.name for f in files]}"
        )
    return load_file(files[0], device="cpu")


def read_transformer_state(
    path: str | Path,
    kind: str,
    *,
    entry: str | None = None,
    lora_path: str | Path | None = None,
    lora_alpha: float = LONGLIVE_LORA_ALPHA,
) -> dict[str, torch.Tensor]:
    """The transformer's state dict in diffusers names, from any supported layout (no model needed)."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {CHECKPOINT_KINDS}")
    path = Path(path)
    if kind == "diffusers":
        if path.is_dir():
            state = _read_safetensors_dir(path)
        elif path.suffix == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            raise CheckpointError(f"{path}: a diffusers checkpoint is a directory or a .safetensors file")
        state = strip_wrapper_prefixes(state) if any(s in k for k in state for s in _WRAPPER_SEGMENTS) else state
        return wan_to_diffusers(state) if is_original_wan_layout(state) else dict(state)

    if kind == "longlive" and path.is_dir():
        lora_path = lora_path or path / LONGLIVE_LORA_FILE
        path = path / LONGLIVE_BASE_FILE
    checkpoint = torch_load_tensors(path)
    state = wan_to_diffusers(strip_wrapper_prefixes(select_generator_state(checkpoint, kind, str(path), entry)))
    if kind == "longlive":
        lora_path = Path(lora_path) if lora_path else path.parent / LONGLIVE_LORA_FILE
        if not lora_path.is_file():
            raise FileNotFoundError(
                f"LongLive needs its LoRA file next to the base ({lora_path} not found); pass lora_path="
            )
        state = merge_lora_into_state(state, read_longlive_lora(lora_path), lora_alpha, str(lora_path))
    return state


def check_state_matches(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(source, missing, unexpected, shapes)


def load_transformer_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    kind: str,
    *,
    entry: str | None = None,
    lora_path: str | Path | None = None,
    lora_alpha: float = LONGLIVE_LORA_ALPHA,
) -> torch.nn.Module:
    """Load a released checkpoint into ``model`` in place (cast to the model's dtype) and return it.

    ``model`` is a diffusers-named Wan transformer without adapters attached. ``entry`` overrides which
    entry of a training checkpoint is used; ``lora_path``/``lora_alpha`` apply to ``kind="longlive"``
    (default: ``lora.pt`` next to the base file, alpha 256 as LongLive trains it).
    """
    state = read_transformer_state(path, kind, entry=entry, lora_path=lora_path, lora_alpha=lora_alpha)
    check_state_matches(model, state, str(path))
    model.load_state_dict(state, strict=True)
    logger.info("loaded %s checkpoint %s (%d tensors)", kind, path, len(state))
    return model
