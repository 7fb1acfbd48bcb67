"""Learner checkpoints: the adapter in standard PEFT format, the optimiser, RNG states and progress.

Layout of `<output>/checkpoints/iter_000012/`:
    adapter/             adapter_config.json + adapter_model.safetensors (loadable by peft / diffusers)
    adapter_<role>/      further adapters the objective keeps (NFT: the EMA old and the reference), same layout
    optimizer.pt         optimiser state dict (tensors and numbers only; loaded with weights_only=True)
    state.json           iteration, policy version, applied group ids, RNG states, controller states
A checkpoint directory is written under a temporary name and renamed when complete, then `latest`
is updated; a crash mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from policy.lora import ADAPTER_WEIGHTS_FILE, PEFT_KEY_PREFIX, import_adapter_state, save_adapter

LATEST = "latest"


class CheckpointNotFound(FileNotFoundError):
    pass


def checkpoint_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:06d}"


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
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "adapter": adapter, **state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / (LATEST + ".tmp")).write_text(final.name)
    (root / (LATEST + ".tmp")).replace(root / LATEST)
    return final


def latest_checkpoint(root: Path) -> Path:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        raise CheckpointNotFound(f"no checkpoint under {root} (missing {pointer})")
    path = Path(root) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointNotFound(f"{pointer} names {path}, which holds no state.json")
    return path


def load_learner_checkpoint(
    path: Path,
    transformer: torch.nn.Module,
    adapter: str,
    optimizer: torch.optim.Optimizer | None,
    extra_adapters: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Restore the adapter weights (and the optimiser) in place; returns the saved state."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("adapter") != adapter:
        raise ValueError(f"{path} holds adapter {state.get('adapter')!r}, this run trains {adapter!r}")
    for dirname, name in {"adapter": adapter, **(extra_adapters or {})}.items():
        weights_file = path / dirname / ADAPTER_WEIGHTS_FILE
        if not weights_file.is_file():
            raise CheckpointNotFound(f"{path} lacks {dirname}/{ADAPTER_WEIGHTS_FILE} (adapter {name!r})")
        with safe_open(weights_file, framework="pt", device="cpu") as handle:
            weights = {key.removeprefix(PEFT_KEY_PREFIX): handle.get_tensor(key) for key in handle.keys()}
        import_adapter_state(transformer, name, weights)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return state
