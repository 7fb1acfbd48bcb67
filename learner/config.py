"""The run configuration: one pydantic model, loaded from YAML plus dotted command-line overrides.

Defaults are the paper's settings (AR-CoPO, Sec. 5.1); `configs/pocket.yaml` adapts them to the
pocket world on a CPU, and `pocket_default()` returns exactly that file's contents, so
`python -m learner.main` with no config runs the pocket default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
POCKET_CONFIG = CONFIG_DIR / "pocket.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PolicySettings(_Section):
    preset: str = "pocket"
    # Paths to real weights; None means the preset's own (the pocket preset ships its weights).
    transformer_checkpoint: Path | None = None
    checkpoint_kind: Literal["self_forcing", "causal_forcing", "longlive", "diffusers"] | None = None
    longlive_lora: Path | None = None
    text_encoder_path: Path | None = None
    vae_path: Path | None = None
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class LoraSettings(_Section):
    rank: int = Field(64, gt=0)
    alpha: float = Field(128.0, gt=0)
    target_modules: list[str] | None = None  # None: every attention and FFN linear of the blocks


class AlgorithmSettings(_Section):
    objective: Literal["copo", "sde_grpo", "nft"] = "copo"
    mode: Literal["on_policy", "semi_on_policy", "off_policy"] = "on_policy"
    group_size: int = Field(12, ge=2)
    perturbation_sigma: float = Field(0.5, ge=0.0, lt=1.0)
    anchors_per_group: int = Field(4, ge=1)
    updates_per_iteration: int = Field(2, ge=1)
    groups_per_iteration: int = Field(8, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    clip_eps: float | None = Field(1e-4, gt=0)
    # Temperature of the distance softmax; "auto" uses the median off-anchor distance of each group.
    tau: float | Literal["auto"] = "auto"
    max_policy_lag: int = Field(1, ge=0)
    # Relative weight of each chunk as the pivot (one per chunk of the preset); None: uniform, the
    # paper's p ~ U(1..L). See docs/pocket.md for why the pocket default weighs early chunks more.
    pivot_weights: list[float] | None = None
    adapter_name: str | None = None  # default: the mode's name
    # SDE-GRPO: stochasticity of the intermediate steps (1.0 = the sampler's own re-noise).
    sde_eta: float = Field(1.0, gt=0, le=1.0)
    # Astrolabe NFT
    nft_beta: float = Field(0.1, gt=0)
    nft_kl_beta: float = Field(1e-4, ge=0)
    nft_window_chunks: int | None = Field(None, ge=1)  # chunks trained from the pivot on; None: to the end
    # Branches per NFT micro-batch (bounds the learner's KV caches: 3 rolling contexts of this many videos).
    nft_micro_batch: int | None = Field(None, ge=1)  # None: all valid branches of a group at once
    # Uncertainty-aware selective regularisation towards a dynamic reference adapter (replaces the base KL).
    nft_selective_reg: bool = False
    nft_aux_heads: list[str] | None = None  # auxiliary rewards of the disagreement; None: every weighted head
    nft_ema_rate: float = Field(0.001, ge=0)  # old adapter decay = min(rate * optimiser steps, max)
    nft_ema_max: float = Field(0.5, ge=0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "AlgorithmSettings":
        if self.pivot_weights is not None and (
            not self.pivot_weights or any(w < 0 for w in self.pivot_weights) or not sum(self.pivot_weights) > 0
        ):
            raise ValueError(
                f"algorithm.pivot_weights must be non-negative with a positive sum (one per chunk), got {self.pivot_weights}"
            )
        if self.anchors_per_group > self.group_size:
            raise ValueError(
                f"algorithm.anchors_per_group ({self.anchors_per_group}) must not exceed "
                f"algorithm.group_size ({self.group_size})"
            )
        return self

    @property
    def effective_clip_eps(self) -> float | None:
        """Off-policy is semi-on-policy without the ratio clip (the paper's ablation)."""
        return None if self.mode == "off_policy" else self.clip_eps

    @property
    def effective_adapter_name(self) -> str:
        return self.adapter_name or self.mode


class RolloutSettings(_Section):
    num_workers: int = Field(2, ge=1)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    num_cpus_per_worker: float = Field(1.0, gt=0)
    # Custom node resources each worker asks for, to pin it to its node group (deploy/: {"rollout_gpu": 1}).
    resources: dict[str, float] = Field(default_factory=dict)
    branch_batch_size: int | None = Field(None, ge=1)
    # "pocket:train" / "pocket:heldout" name the pocket prompt sets; anything else is a text file, one prompt a line.
    prompts: str = "pocket:train"
    eval_prompts: str = "pocket:heldout"


class RewardSettings(_Section):
    model: str = "pocket"
    options: dict[str, Any] = Field(default_factory=dict)  # passed to the reward model's factory
    weights: dict[str, float] = Field(default_factory=lambda: {"VQ": 1.0, "MQ": 1.0, "TA": 1.0})
    advantage: Literal["weighted_sum", "per_head"] = "weighted_sum"
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)  # e.g. {"reward_gpu": 1}
    batch_size: int = Field(8, ge=1)
    timeout_s: float = Field(300.0, gt=0)
    min_valid_per_group: int = Field(2, ge=2)


class ReplaySettings(_Section):
    url: str | None = None  # None: an embedded local store under the output directory
    max_queue_groups: int = Field(256, ge=1)
    buffer_groups: int = Field(100, ge=1)  # semi-on-policy reference buffer size
    import_buffer: Path | None = None  # reuse an exported reference buffer instead of collecting one
    export_buffer: bool = True


class RunSettings(_Section):
    iterations: int = Field(100, ge=0)
    seed: int = 0
    eval_every: int = Field(10, ge=0)  # 0: evaluate only before and after training
    eval_prompts_limit: int | None = Field(None, ge=1)
    eval_seeds: int = Field(1, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    learner_num_gpus: float = Field(0.0, ge=0)
    learner_resources: dict[str, float] = Field(default_factory=dict)  # e.g. {"learner_gpu": 1}


class Config(_Section):
    policy: PolicySettings = Field(default_factory=PolicySettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    algorithm: AlgorithmSettings = Field(default_factory=AlgorithmSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    run: RunSettings = Field(default_factory=RunSettings)

    @model_validator(mode="after")
    def _check_queue_room(self) -> "Config":
        # On-policy groups are acked when a checkpoint holds their update; rollout workers stop when the
        # queue holds max_queue_groups unacked groups, so a checkpoint interval must fit in it (plus the
        # next iteration's groups, produced while the learner trains).
        unacked = self.algorithm.groups_per_iteration * (self.run.checkpoint_every + 1)
        if self.algorithm.mode == "on_policy" and unacked > self.replay.max_queue_groups:
            raise ValueError(
                f"replay.max_queue_groups ({self.replay.max_queue_groups}) must be at least algorithm.groups_per_iteration "
                f"x (run.checkpoint_every + 1) = {unacked}: groups stay unacked until a checkpoint; lower "
                "run.checkpoint_every or raise replay.max_queue_groups"
            )
        return self


class ConfigError(ValueError):
    """A configuration problem, with the offending field named."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`algorithm.learning_rate=3e-4` -> (["algorithm", "learning_rate"], 3e-4). Values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (the pocket default when `path` is None), apply overrides, validate."""
    source = Path(path) if path is not None else POCKET_CONFIG
    if not source.is_file():
        raise ConfigError(f"config file not found: {source}")
    data = yaml.safe_load(source.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for text in overrides:
        _apply_override(data, *parse_override(text))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(source))) from None


def pocket_default() -> Config:
    return load_config(POCKET_CONFIG)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
