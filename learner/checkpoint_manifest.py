"""Integrity of a learner checkpoint: a manifest of SHA-256 digests, and finite tensors.

`manifest.json` lists every file of the checkpoint directory (relative path -> size and SHA-256). It
is written last, inside the temporary directory, so a checkpoint whose manifest is missing was never
completed; a file whose digest differs was damaged after it was written (a flipped bit on disk, a
partial copy). A checkpoint can also be intact yet useless: weights or optimiser moments that are
NaN or infinite would poison every later update, so they are refused too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class CheckpointDamaged(ValueError):
    """A checkpoint that exists but must not be restored; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path} is damaged: {problem}")
        self.path, self.problem = Path(path), problem


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> Path:
    """Digest every file under `directory` (the manifest itself excepted) into `directory/manifest.json`."""
    directory = Path(directory)
    files = {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    target = directory / MANIFEST
    target.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
    return target


def verify_manifest(directory: Path) -> None:
    """Raise CheckpointDamaged unless every file the manifest lists is present with its size and digest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointDamaged(directory, f"{MANIFEST} is missing (the checkpoint was never completed, or was "
                                           "written by a version without manifests)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointDamaged(directory, f"{MANIFEST} is unreadable ({type(err).__name__}: {err})") from None
    for name, entry in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise CheckpointDamaged(directory, f"{name} is missing (listed in {MANIFEST})")
        if path.stat().st_size != entry.get("bytes"):
            raise CheckpointDamaged(directory, f"{name} has {path.stat().st_size} bytes, {MANIFEST} says {entry.get('bytes')}")
        if sha256_file(path) != entry.get("sha256"):
            raise CheckpointDamaged(directory, f"{name} does not match its SHA-256 in {MANIFEST} (the file changed after it was written)")


def non_finite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding a NaN or an infinity."""
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def require_finite(tensors: Mapping[str, torch.Tensor], directory: Path, where: str) -> None:
    bad = non_finite_keys(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointDamaged(directory, f"{where} holds NaN or infinite values in {len(bad)} tensor(s): {shown}")


def optimizer_tensors(state: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of an optimiser state dict, keyed `state.<param>.<name>`."""
    out: dict[str, torch.Tensor] = {}
    for param, values in state.get("state", {}).items():
        for name, value in _items(values):
            if isinstance(value, torch.Tensor):
                out[f"state.{param}.{name}"] = value
    return out


def _items(values) -> Iterable:
    return values.items() if isinstance(values, Mapping) else ()
