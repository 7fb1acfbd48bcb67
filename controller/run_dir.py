"""The output directory of a run: who may write into it, and how a resume is checked before it does.

- A new run refuses a directory that holds an earlier run's files (RUN_FILES): mixing two runs would
  mix their metrics, and the earlier run's replay store would refuse the new run's groups as applied.
- `--resume` checks the checkpoint it will continue from completely (learner.checkpoint.verify_checkpoint)
  before anything is written. When the latest checkpoint is damaged, the error names the newest
  intact one; `--resume-from NAME` continues from it: the newer checkpoints are moved to
  `checkpoints/set_aside/` and the run's group ids get a new tag, because the groups those
  checkpoints applied are marked applied in the store and would be refused if asked for again.
- The first run's `config.yaml` is kept; each resume writes its own config beside it
  (`config.resume-N.yaml`) and logs the fields that differ.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from learner.checkpoint import (
    LATEST,
    CheckpointDamaged,
    CheckpointNotFound,
    CheckpointState,
    checkpoints_newest_first,
    latest_checkpoint,
    verify_checkpoint,
)
from controller.config import Config, dump_config
from controller.store_identity import EPOCH_FILE

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
SET_ASIDE = "set_aside"
# What a run leaves in its output directory (a scale request alone does not make it an earlier run).
RUN_FILES = ("checkpoints", "metrics.jsonl", "replay", EPOCH_FILE, CONFIG_FILE, "samples", "reward_curve.png",
             "reference_buffer", "reference_buffer.json", "tensorboard", "mlruns", "wandb", "tracker_runs.json")


class ResumeError(RuntimeError):
    """`--resume` cannot continue: no checkpoint, or a damaged one (the message says what to do)."""


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    state: CheckpointState
    run_tag: str  # the prefix of the group ids from here on
    set_aside: tuple[Path, ...] = ()  # newer checkpoints to move away (with --resume-from)


def refuse_earlier_run(output: Path) -> None:
    found = [name for name in RUN_FILES if (Path(output) / name).exists()]
    if found:
        raise FileExistsError(
            f"{output} holds an earlier run's files ({', '.join(found)}): pass --resume to continue it from its "
            "newest checkpoint, or choose a new --output"
        )


def find_resume_point(output: Path, config: Config, resume_from: str | None = None) -> ResumePoint:
    """The checkpoint a resume continues from, fully verified; writes nothing."""
    output = Path(output)
    root = output / "checkpoints"
    adapter, rank = config.algorithm.effective_adapter_name, config.lora.rank
    if resume_from is None:
        try:
            path = latest_checkpoint(root)
        except CheckpointNotFound as err:
            if checkpoints_newest_first(root):  # `latest` lost or naming a directory that is gone
                raise ResumeError(f"{err}\n{_offer_intact(root, None, adapter, rank)}") from None
            raise ResumeError(_nothing_to_resume(output, err)) from None
        state = _verify(root, path, adapter, rank)
        return ResumePoint(path, state, state.run_tag or output.name)
    path = Path(resume_from) if Path(resume_from).is_absolute() else root / resume_from
    if path.parent.resolve() != root.resolve() or not path.is_dir():
        raise ResumeError(f"--resume-from {resume_from}: no checkpoint directory {path} in {root}")
    state = _verify(root, path, adapter, rank)
    newer = tuple(p for p in checkpoints_newest_first(root) if _iteration(p) > state.iteration)
    tag = state.run_tag or output.name
    if newer:  # their groups are applied in the store: the iterations done again need new group ids
        tag = f"{output.name}-{secrets.token_hex(3)}"
    return ResumePoint(path, state, tag, newer)


def _verify(root: Path, path: Path, adapter: str, rank: int) -> CheckpointState:
    try:
        return verify_checkpoint(path, adapter, rank)
    except CheckpointDamaged as err:
        raise ResumeError(f"{err}\n{_offer_intact(root, path, adapter, rank)}") from None
    except ValueError as err:  # a checkpoint of another kind of run (adapter name, LoRA rank)
        raise ResumeError(f"cannot resume from {path}: {err}") from None


def adopt(point: ResumePoint) -> None:
    """Make `point` the latest checkpoint (moving newer ones to checkpoints/set_aside/)."""
    root = point.path.parent
    for newer in point.set_aside:
        target = root / SET_ASIDE / newer.name
        if target.exists():
            target = target.with_name(f"{newer.name}.{secrets.token_hex(3)}")
        target.parent.mkdir(exist_ok=True)
        shutil.move(str(newer), str(target))
        log.warning("checkpoint %s moved to %s: the run continues from %s", newer.name, target, point.path.name)
    pointer = root / LATEST
    if not pointer.is_file() or pointer.read_text().strip() != point.path.name:
        (root / (LATEST + ".tmp")).write_text(point.path.name)
        (root / (LATEST + ".tmp")).replace(root / LATEST)


def write_config_records(output: Path, config: Config, resume: bool) -> Path:
    """Write config.yaml for a new run; on resume keep it and write config.resume-N.yaml beside it,
    logging the fields that differ from the first run's."""
    output = Path(output)
    first = output / CONFIG_FILE
    text = dump_config(config)
    if not resume or not first.exists():
        first.write_text(text)
        return first
    n = 1
    while (output / f"config.resume-{n}.yaml").exists():
        n += 1
    record = output / f"config.resume-{n}.yaml"
    record.write_text(text)
    changed = _differences(yaml.safe_load(first.read_text()) or {}, yaml.safe_load(text) or {})
    if changed:
        log.warning("resumed with a config that differs from %s in %s (recorded in %s)", first, ", ".join(changed), record.name)
    return record


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.extend(_differences(x, y, f"{prefix}{key}."))
        elif x != y:
            out.append(f"{prefix}{key} ({x!r} -> {y!r})")
    return out


def _nothing_to_resume(output: Path, err: Exception) -> str:
    earlier = [name for name in RUN_FILES if (output / name).exists() and name != "checkpoints"]
    if earlier:
        return (f"nothing to resume in {output}: {err}. The earlier run stopped before its first checkpoint "
                "(run.checkpoint_every); start again in a new --output (and, with a shared replay store, a new "
                "prefix), or delete this directory")
    return f"nothing to resume: {err}"


def _offer_intact(root: Path, damaged: Path | None, adapter: str, rank: int) -> str:
    """Name the newest intact checkpoint older than `damaged` (any, if None), and how to continue from it."""
    problems = []
    for path in checkpoints_newest_first(root):
        if damaged is not None and _iteration(path) >= _iteration(damaged):
            continue
        try:
            state = verify_checkpoint(path, adapter, rank)
        except (CheckpointDamaged, ValueError) as err:
            problems.append(str(err))
            continue
        return (f"The newest intact checkpoint{'' if damaged is None else ' before it'} is {path.name} (iteration {state.iteration}, policy version "
                f"{state.policy_version}). To continue from it, run again with `--resume --resume-from {path.name}`: "
                f"the checkpoints after it move to {root / SET_ASIDE} and its later iterations are trained again.")
    return "No older intact checkpoint was found" + (f" ({'; '.join(problems)})" if problems else "") + "."


def _iteration(path: Path) -> int:
    digits = path.name.removeprefix("iter_")
    return int(digits) if digits.isdigit() else -1
