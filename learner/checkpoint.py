"""Learner checkpoints: the adapter in standard PEFT format, the optimiser, RNG states and progress.

Layout of `<output>/checkpoints/iter_000012/`:
    adapter/             adapter_config.json + adapter_model.safetensors (loadable by peft / diffusers)
    adapter_<role>/      further adapters the objective keeps (NFT: the EMA old and the reference), same layout
    optimizer.pt         optimiser state dict (tensors and numbers only; loaded with weights_only=True)
    state.json           iteration, policy version, applied group ids, RNG states, controller states
    manifest.json        size and SHA-256 of every other file (learner/checkpoint_manifest.py)
A checkpoint directory is written under a temporary name and renamed when complete, then `latest`
is updated; a crash mid-write leaves the previous checkpoint as the latest. A restore checks the
manifest, validates state.json (`CheckpointState`) and refuses NaN or infinite weights, so a
damaged checkpoint is reported by file and field instead of being trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from safetensors import SafetensorError, safe_open

from learner.checkpoint_manifest import (
    CheckpointDamaged,
    optimizer_tensors,
    require_finite,
    verify_manifest,
    write_manifest,
)
from policy.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_KEY_PREFIX, import_adapter_state, save_adapter

LATEST = "latest"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_PREFIX = "iter_"

__all__ = ["CheckpointDamaged", "CheckpointNotFound", "CheckpointState", "latest_checkpoint", "load_learner_checkpoint",
           "read_checkpoint_state", "save_learner_checkpoint", "verify_checkpoint"]


class CheckpointNotFound(FileNotFoundError):
    pass


_Byte = Annotated[int, Field(ge=0, le=255, strict=True)]
_Count = Annotated[int, Field(ge=0, strict=True)]


class UnackedDelivery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group_id: StrictStr
    entry_id: StrictStr
    consumer: StrictStr
    handle: Any = None


class CheckpointState(BaseModel):
    """state.json. The learner's fields are checked; other keys (the driver's state, an objective's
    controller states) pass through to whoever wrote them."""

    model_config = ConfigDict(extra="allow")
    iteration: _Count
    adapter: StrictStr = Field(min_length=1)
    policy_version: _Count
    applied_group_ids: list[StrictStr]
    anchor_rng: list[_Byte] = Field(min_length=1)
    buffer_rng: dict[str, Any]
    torch_rng: list[_Byte] = Field(min_length=1)
    unacked: list[UnackedDelivery] = Field(default_factory=list)
    # The driver's part (learner.main): metrics rows written, and the prefix of the run's group ids.
    metrics_rows: _Count | None = None
    run_tag: StrictStr | None = None


def checkpoint_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"{CHECKPOINT_PREFIX}{iteration:06d}"


def save_learner_checkpoint(
    root: Path,
    iteration: int,
    transformer: torch.nn.Module,
    adapter: str,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra_adapters: dict[str, str] | None = None,
) -> Path:
    """`extra_adapters` maps a directory name inside the checkpoint to the adapter saved there."""
    root = Path(root)
    final = checkpoint_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(transformer, adapter, tmp / "adapter")
    for dirname, name in (extra_adapters or {}).items():
        save_adapter(transformer, name, tmp / dirname)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({"iteration": iteration, "adapter": adapter, **state}, indent=1))
    write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / (LATEST + ".tmp")).write_text(final.name)
    (root / (LATEST + ".tmp")).replace(root / LATEST)
    return final


def latest_checkpoint(root: Path) -> Path:
    """The checkpoint `latest` names (its integrity is checked on restore, not here)."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        raise CheckpointNotFound(f"no checkpoint under {root} (missing {pointer})")
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise CheckpointNotFound(f"{pointer} names {path}, which holds no {STATE_FILE}")
    return path


def checkpoints_newest_first(root: Path) -> list[Path]:
    """Every completed checkpoint directory under `root`, the highest iteration first."""
    found = [p for p in Path(root).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), reverse=True)


def read_checkpoint_state(path: Path) -> CheckpointState:
    """state.json, validated; errors name the file and the field."""
    file = Path(path) / STATE_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointDamaged(path, f"{STATE_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointDamaged(path, f"{file} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointDamaged(path, f"{file} must hold a JSON object, not {type(data).__name__}")
    try:
        return CheckpointState.model_validate(data)
    except ValidationError as err:
        fields = "; ".join(f"field {'.'.join(str(p) for p in e['loc'][:2]) or '<root>'}: {e['msg']}" for e in err.errors()[:5])
        raise CheckpointDamaged(path, f"{file}: {fields}") from None


def _read_weights(path: Path, dirname: str) -> dict[str, torch.Tensor]:
    weights_file = path / dirname / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        raise CheckpointNotFound(f"{path} lacks {dirname}/{ADAPTER_WEIGHTS_FILE}")
    try:
        with safe_open(weights_file, framework="pt", device="cpu") as handle:
            weights = {key.removeprefix(PEFT_KEY_PREFIX): handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointDamaged(path, f"{dirname}/{ADAPTER_WEIGHTS_FILE} cannot be read: {err}") from None
    require_finite(weights, path, f"{dirname}/{ADAPTER_WEIGHTS_FILE}")
    return weights


def _read_optimizer(path: Path) -> dict:
    try:
        state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointDamaged(path, f"{OPTIMIZER_FILE} is missing") from None
    except Exception as err:  # torch.load raises many kinds (unpickling refused, truncated zip, ...)
        raise CheckpointDamaged(path, f"{OPTIMIZER_FILE} cannot be read: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointDamaged(path, f"{OPTIMIZER_FILE} holds a {type(state).__name__}, not an optimiser state dict")
    require_finite(optimizer_tensors(state), path, OPTIMIZER_FILE)
    return state


def verify_checkpoint(path: Path, adapter: str | None = None, lora_rank: int | None = None) -> CheckpointState:
    """Every check a restore makes, without a model: the manifest's digests, state.json, finite adapter
    weights (every adapter directory) and optimiser state, and, where given, the adapter's name and rank
    this run expects. Returns the validated state; raises CheckpointDamaged (or ValueError for a
    checkpoint of another run's kind)."""
    path = Path(path)
    verify_manifest(path)
    state = read_checkpoint_state(path)
    _check_kind(path, state, adapter)
    for weights_dir in sorted(p.parent.name for p in path.glob(f"*/{ADAPTER_WEIGHTS_FILE}")):
        _read_weights(path, weights_dir)
    if lora_rank is not None:
        saved = json.loads((path / "adapter" / ADAPTER_CONFIG_FILE).read_text()).get("r")
        if saved != lora_rank:
            raise ValueError(f"{path} holds a LoRA adapter of rank {saved}, this run's lora.rank is {lora_rank}")
    _read_optimizer(path)
    return state


def _check_kind(path: Path, state: CheckpointState, adapter: str | None) -> None:
    if adapter is not None and state.adapter != adapter:
        raise ValueError(f"{path} holds adapter {state.adapter!r}, this run trains {adapter!r}")


def load_learner_checkpoint(
    path: Path,
    transformer: torch.nn.Module,
    adapter: str,
    optimizer: torch.optim.Optimizer | None,
    extra_adapters: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Verify, then restore the adapter weights (and the optimiser) in place; returns the saved state.
    Nothing is changed when the checkpoint is damaged."""
    path = Path(path)
    verify_manifest(path)
    state = read_checkpoint_state(path)
    _check_kind(path, state, adapter)
    weights = {dirname: (name, _read_weights(path, dirname)) for dirname, name in {"adapter": adapter, **(extra_adapters or {})}.items()}
    optimizer_state = _read_optimizer(path) if optimizer is not None else None
    for name, tensors in weights.values():
        import_adapter_state(transformer, name, tensors)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    return state.model_dump()
