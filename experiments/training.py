"""Training runs through the real driver (`controller.driver.train`), one output directory per run.

A run's directory is named by its label, seed and a hash of its full configuration, and gets a
`finished.json` when training returned. A finished run with the same configuration is reused (the
on-policy AR-CoPO runs serve Figure 2, Table 3 and the NFT comparison alike); `fresh=True` reuses
only runs finished by this process. All runs of a process share one Ray instance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from controller.config import CONFIG_DIR, Config, load_config
from learner.checkpoint import latest_checkpoint

log = logging.getLogger("experiments")
FINISHED = "finished.json"
_finished_here: set[Path] = set()


@dataclass
class RunResult:
    label: str
    seed: int
    directory: Path
    rows: list[dict]
    wall_s: float  # wall time of the training itself, measured when it ran
    reused: bool  # finished before this call (earlier in this process, or by an earlier command)

    @property
    def adapter_dir(self) -> Path:
        return latest_checkpoint(self.directory / "checkpoints") / "adapter"


def run_config(config_file: str | None, overrides: list[str]) -> Config:
    """`config_file` is a name under configs/ (e.g. "pocket_nft.yaml") or None for the pocket default."""
    return load_config(CONFIG_DIR / config_file if config_file else None, overrides)


def config_hash(config: Config) -> str:
    """Hash of the configuration and of the pocket base weights it trains (retrained weights: new runs)."""
    digest = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())
    if config.policy.preset == "pocket":
        from pocket.preset import WEIGHTS_DIR

        weights = Path(config.policy.transformer_checkpoint or WEIGHTS_DIR) / "diffusion_pytorch_model.safetensors"
        if weights.is_file():
            digest.update(hashlib.sha256(weights.read_bytes()).digest())
    return digest.hexdigest()[:10]


def ensure_ray(num_workers: int) -> None:
    """One local Ray instance for every run of this process (RAY_ADDRESS: attach to that cluster)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:  # a new local instance ("local": never a cluster another process started with `ray start`);
        # rollout workers + the reward actor + the learner, one CPU slot each
        ray.init(address="local", num_cpus=max(num_workers + 2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)


def train_run(label: str, config: Config, work_dir: Path, fresh: bool = False) -> RunResult:
    """Train `config` (or reuse its finished run) under `work_dir`; returns the metrics rows."""
    from controller.driver import train

    directory = Path(work_dir) / f"{label}-seed{config.run.seed}-{config_hash(config)}"
    marker = directory / FINISHED
    if marker.is_file() and (not fresh or directory.resolve() in _finished_here):
        info = json.loads(marker.read_text())
        log.info("reusing %s (finished %s)", directory, info["finished_at"])
        return RunResult(label, config.run.seed, directory, _rows(directory), float(info["wall_s"]), reused=True)
    if directory.exists():
        shutil.rmtree(directory)  # unfinished or stale: start it again from scratch
    ensure_ray(config.rollout.num_workers)
    log.info("training %s (seed %d) into %s", label, config.run.seed, directory)
    t0 = time.perf_counter()
    rows = train(config, directory)
    wall = time.perf_counter() - t0
    if len(rows) != config.run.iterations:
        raise RuntimeError(f"{directory}: training returned {len(rows)} rows for {config.run.iterations} iterations")
    marker.write_text(json.dumps({"wall_s": wall, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}))
    _finished_here.add(directory.resolve())
    return RunResult(label, config.run.seed, directory, rows, wall, reused=False)


def _rows(directory: Path) -> list[dict]:
    from controller.run_log import MetricsLog

    return MetricsLog(directory / "metrics.jsonl").read()


def runs_note(runs: list[RunResult]) -> str:
    """How much training the section's runs took, and which were reused."""
    trained = [r for r in runs if not r.reused]
    reused = [r for r in runs if r.reused]
    note = f"{len(runs)} training runs, {sum(r.wall_s for r in runs):.0f} s of training in all"
    if reused:
        note += f" ({len(reused)} reused from an earlier experiment: {', '.join(sorted({r.label for r in reused}))})"
    if trained:
        note += f"; mean {sum(r.wall_s for r in trained) / len(trained):.0f} s per run trained now"
    return note
