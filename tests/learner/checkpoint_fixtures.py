"""Learner checkpoints as the learner actor writes them (pocket transformer, a trained-looking LoRA
adapter, an AdamW state after real steps, the full state.json), without Ray."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from learner.checkpoint import save_learner_checkpoint
from learner.checkpoint_manifest import write_manifest
from policy.lora import attach_adapter
from pocket.preset import new_transformer

ADAPTER = "on_policy"
RANK = 4


def adapted_transformer() -> torch.nn.Module:
    return attach_adapter(new_transformer(0), ADAPTER, rank=RANK, alpha=2 * RANK)


def learner_state(iteration: int) -> dict:
    return {
        "policy_version": iteration,
        "applied_group_ids": [f"run-it{iteration - 1:06d}-{k:04d}" for k in range(2)],
        "anchor_rng": torch.Generator().manual_seed(1).get_state().tolist(),
        "buffer_rng": np.random.default_rng(2).bit_generator.state,
        "torch_rng": torch.get_rng_state().tolist(),
        "unacked": [],
        "metrics_rows": iteration,
        "run_tag": "run",
    }


def write_checkpoint(root: Path, iteration: int, seed: int = 0, nan_weight: bool = False) -> tuple[Path, dict]:
    """A checkpoint after `iteration` AdamW steps on the LoRA parameters; returns it and its adapter's tensors."""
    torch.manual_seed(seed)
    transformer = adapted_transformer()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(max(1, iteration)):
        optimizer.zero_grad()
        sum((p * torch.randn_like(p)).sum() for p in params).backward()
        optimizer.step()
    if nan_weight:
        with torch.no_grad():
            next(p for n, p in transformer.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    path = save_learner_checkpoint(root, iteration, transformer, ADAPTER, optimizer, learner_state(iteration))
    weights = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}
    return path, weights


def flip_tensor_byte(safetensors_file: Path) -> None:
    """Flip one byte inside the tensor data (past the JSON header), as bit rot on disk would."""
    data = bytearray(safetensors_file.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    at = 8 + header + (len(data) - 8 - header) // 2
    data[at] ^= 0x40
    safetensors_file.write_bytes(bytes(data))


def rewrite_state(path: Path, update: dict, drop: tuple[str, ...] = (), keep_manifest_valid: bool = True) -> None:
    """Edit state.json (and re-digest the checkpoint, as a buggy writer would have produced it)."""
    state = json.loads((path / "state.json").read_text())
    state.update(update)
    for key in drop:
        state.pop(key)
    (path / "state.json").write_text(json.dumps(state))
    if keep_manifest_valid:
        write_manifest(path)
