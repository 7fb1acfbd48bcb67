"""Named LoRA adapters on the Wan transformer, through peft (diffusers' ``PeftAdapterMixin``).

- Adapter weights travel as a flat ``{"<module>.lora_A.weight": tensor, ...}`` dict whose keys do not
  name the adapter (PEFT's own saved names), so one adapter's state can be imported under another name.
- On disk an adapter is the standard PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``
  with ``base_model.model.``-prefixed keys. It loads with ``peft.PeftModel.from_pretrained(base, dir)``
  and with diffusers' ``transformer.load_lora_adapter(dir, weight_name="adapter_model.safetensors",
  prefix="base_model.model", adapter_name=...)`` (the LoRA config is also stored in the file's metadata
  under that prefix, diffusers' convention, so alpha != rank survives).
- The delta of an adapter on a Linear is ``alpha / rank * B @ A`` (``alpha / sqrt(rank)`` with rsLoRA).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file

# Every Linear of a Wan block: self- and cross-attention projections and the feed-forward pair.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PEFT_KEY_PREFIX = "base_model.model."
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


class AdapterStateError(ValueError):
    """Adapter weights that do not fit the adapter they are loaded into."""


def adapter_names(transformer: torch.nn.Module) -> list[str]:
    return list(getattr(transformer, "peft_config", {}) or {})


def _require(transformer: torch.nn.Module, name: str) -> None:
    if name not in adapter_names(transformer):
        raise KeyError(f"no adapter named {name!r} on the transformer (adapters: {adapter_names(transformer)})")


def attach_adapter(
    transformer: torch.nn.Module,
    name: str,
    rank: int = 64,
    alpha: float = 128.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> torch.nn.Module:
    """Add a LoRA adapter (B initialised to zero, so outputs are unchanged) and make it the active one.

    peft freezes the base weights; only the active adapter's tensors require grad.
    """
    if name in adapter_names(transformer):
        raise ValueError(f"adapter {name!r} already exists on the transformer")
    if rank <= 0 or alpha <= 0:
        raise ValueError(f"LoRA rank and alpha must be positive (got rank={rank}, alpha={alpha})")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, init_lora_weights=True
    )
    _add_adapter(transformer, config, name)
    wrapped = [module_name for module_name, module in _lora_layers(transformer, name)]
    unmatched = [t for t in target_modules if not any(m == t or m.endswith("." + t) for m in wrapped)]
    if unmatched:
        transformer.delete_adapters(name)
        raise ValueError(f"LoRA target modules {unmatched} match no Linear of the transformer")
    return transformer


def _add_adapter(transformer: torch.nn.Module, config: LoraConfig, name: str) -> None:
    with warnings.catch_warnings():
        # Several named adapters on one model is the point here, not an accident.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(config, adapter_name=name)


def _lora_layers(transformer: torch.nn.Module, name: str) -> Iterator[tuple[str, LoraLayer]]:
    for module_name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            yield module_name, module


def _adapter_parameters(transformer: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    _require(transformer, name)
    params = {}
    for module_name, module in _lora_layers(transformer, name):
        params[f"{module_name}.lora_A.weight"] = module.lora_A[name].weight
        params[f"{module_name}.lora_B.weight"] = module.lora_B[name].weight
    return params


def set_active_adapter(transformer: torch.nn.Module, name: str) -> None:
    """Run (and train) only adapter ``name``; the others stay attached, inactive and frozen."""
    _require(transformer, name)
    transformer.set_adapter(name)


@contextlib.contextmanager
def disable_adapters(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block the transformer computes with its base weights only; state is restored after."""
    layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = [layer.disable_adapters for layer in layers]
    requires_grad = {id(p): p.requires_grad for p in transformer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield transformer
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for p in transformer.parameters():
            p.requires_grad_(requires_grad[id(p)])


def export_adapter_state(
    transformer: torch.nn.Module, name: str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors: flat, detached copies on the CPU (cast to ``dtype`` if given), contiguous,
    keys without the name."""
    return {
        key: param.detach().to("cpu", dtype=dtype, copy=True).contiguous()
        for key, param in _adapter_parameters(transformer, name).items()
    }


def import_adapter_state(transformer: torch.nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (as exported) into adapter ``name``; every key and shape must match, else nothing changes."""
    params = _adapter_parameters(transformer, name)
    missing = sorted(k for k in params if k not in state)
    unexpected = sorted(k for k in state if k not in params)
    shapes = sorted(
        f"{k}: given {tuple(state[k].shape)} vs adapter {tuple(p.shape)}"
        for k, p in params.items()
        if k in state and tuple(state[k].shape) != tuple(p.shape)
    )
    if missing or unexpected or shapes:
        lines = [f"adapter state does not fit adapter {name!r}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
            if keys:
                lines.append(f"  {len(keys)} {title}: {', '.join(keys[:30])}{' ...' if len(keys) > 30 else ''}")
        raise AdapterStateError("\n".join(lines))
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(device=param.device, dtype=param.dtype))


def _config_dict(config: LoraConfig) -> dict:
    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        return value

    return {key: plain(value) for key, value in config.to_dict().items()}


def save_adapter(transformer: torch.nn.Module, name: str, directory: str | Path) -> Path:
    """Write adapter ``name`` in the standard PEFT layout (see module docstring)."""
    _require(transformer, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(transformer.peft_config[name])
    config.inference_mode = True
    weights = {PEFT_KEY_PREFIX + k: v for k, v in export_adapter_state(transformer, name).items()}
    prefixed_config = {PEFT_KEY_PREFIX.rstrip(".") + "." + k: v for k, v in _config_dict(config).items()}
    metadata = {"format": "pt", _DIFFUSERS_METADATA_KEY: json.dumps(prefixed_config, sort_keys=True)}
    save_file(weights, directory / ADAPTER_WEIGHTS_FILE, metadata=metadata)
    config.save_pretrained(str(directory))
    return directory


def load_adapter(transformer: torch.nn.Module, directory: str | Path, name: str) -> torch.nn.Module:
    """Attach the adapter saved in ``directory`` (standard PEFT layout) under ``name`` and make it active."""
    directory = Path(directory)
    for required in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        if not (directory / required).is_file():
            raise FileNotFoundError(f"{directory / required} not found: not a PEFT adapter directory")
    config = LoraConfig.from_pretrained(str(directory))
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA" or config.use_dora:
        raise ValueError(f"{directory}: only plain LoRA adapters are supported (got {config.peft_type})")
    with safe_open(directory / ADAPTER_WEIGHTS_FILE, framework="pt", device="cpu") as handle:
        state = {key.removeprefix(PEFT_KEY_PREFIX): handle.get_tensor(key) for key in handle.keys()}
    if name in adapter_names(transformer):
        raise ValueError(f"adapter {name!r} already exists on the transformer")
    config.inference_mode = False
    _add_adapter(transformer, config, name)
    try:
        import_adapter_state(transformer, name, state)
    except AdapterStateError as error:
        transformer.delete_adapters(name)
        raise AdapterStateError(f"{directory}: {error}") from error
    return transformer


def adapter_delta(layer: LoraLayer, name: str, use_rslora: bool = False) -> torch.Tensor:
    """``scaling * B @ A`` of one wrapped Linear, in float64."""
    rank, alpha = layer.r[name], layer.lora_alpha[name]
    scaling = alpha / rank**0.5 if use_rslora else alpha / rank
    return (layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()) * scaling


def merge_adapters(
    transformer: torch.nn.Module, scales: Mapping[str, float], inplace: bool = False
) -> torch.nn.Module:
    """A plain transformer (no LoRA layers) whose weights are ``W + sum_i scales[i] * delta_i``.

    By default a new model is returned and ``transformer`` keeps its adapters untouched; with
    ``inplace=True`` ``transformer`` itself is merged and loses all its adapters. Parameters come back
    frozen (``requires_grad=False``).
    """
    for name in scales:
        _require(transformer, name)
    merged = transformer if inplace else copy.deepcopy(transformer)
    rslora = {name: bool(merged.peft_config[name].use_rslora) for name in scales}
    with torch.no_grad():
        for module in list(merged.modules()):
            if not isinstance(module, LoraLayer):
                continue
            present = [(n, s) for n, s in scales.items() if n in module.lora_A]
            if not present:
                continue
            weight = module.get_base_layer().weight
            total = sum(s * adapter_delta(module, n, rslora[n]) for n, s in present)
            weight.copy_((weight.double() + total).to(weight.dtype))
    recurse_remove_peft_layers(merged)
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    merged._hf_peft_config_loaded = None
    return merged.requires_grad_(False)


def remove_adapter(transformer: torch.nn.Module, name: str) -> None:
    _require(transformer, name)
    transformer.delete_adapters(name)
