"""The run configuration: one pydantic model, loaded from YAML plus dotted command-line overrides.

Defaults are the paper's settings (AR-CoPO, Sec. 5.1); `configs/pocket.yaml` adapts them to the
pocket world on a CPU, and `pocket_default()` returns exactly that file's contents, so
`python -m learner.main` with no config runs the pocket default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
POCKET_CONFIG = CONFIG_DIR / "pocket.yaml"


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number here")
    return value


# Numbers that refuse booleans (pydantic would read true as 1). Numeric strings stay accepted: YAML
# 1.1 reads `1e-4` (no dot) as a string.
Int = Annotated[int, BeforeValidator(_not_a_bool)]
Real = Annotated[float, BeforeValidator(_not_a_bool)]


class _Section(BaseModel):
    # No infinities or NaN: never a count, a rate or a size.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PolicySettings(_Section):
    preset: str = "pocket"
    # Paths to real weights; None means the preset's own (the pocket preset ships its weights).
    transformer_checkpoint: Path | None = None
    checkpoint_kind: Literal["self_forcing", "causal_forcing", "longlive", "diffusers"] | None = None
    longlive_lora: Path | None = None
    text_encoder_path: Path | None = None
    vae_path: Path | None = None
    device: str = "auto"
    # Dtype of the frozen base weights and of the compute; the trainable LoRA adapter, its gradients, the
    # optimiser state and the checkpointed adapter stay float32 whatever this is (learner/mixed_precision.py).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Recompute each transformer block's activations in the learner's backward (torch.utils.checkpoint
    # per block) instead of saving them: the saved activations of a replayed sample shrink to each
    # block's input; the backward costs one more forward. Same gradient either way.
    activation_checkpointing: bool = False


class LoraSettings(_Section):
    rank: Int = Field(64, gt=0)
    alpha: Real = Field(128.0, gt=0)
    target_modules: list[str] | None = None  # None: every attention and FFN linear of the blocks


class AlgorithmSettings(_Section):
    objective: Literal["copo", "sde_grpo", "nft"] = "copo"
    mode: Literal["on_policy", "semi_on_policy", "off_policy"] = "on_policy"
    group_size: Int = Field(12, ge=2)
    perturbation_sigma: Real = Field(0.5, ge=0.0, lt=1.0)
    anchors_per_group: Int = Field(4, ge=1)
    updates_per_iteration: Int = Field(2, ge=1)
    groups_per_iteration: Int = Field(8, ge=1)
    learning_rate: Real = Field(1e-5, gt=0)
    # (anchor, step) samples per pivot-replay forward with gradient (copo, sde_grpo): the group's samples
    # are replayed in micro-batches of this size and their gradients accumulated, which equals the
    # full batch's gradient; it bounds the learner's saved activations. None: all samples in one forward.
    micro_batch_size: Int | None = Field(None, ge=1)
    weight_decay: Real = Field(0.0, ge=0)
    max_grad_norm: Real = Field(1.0, gt=0)
    clip_eps: Real | None = Field(1e-4, gt=0)
    # Temperature of the distance softmax; "auto" uses the median off-anchor distance of each group.
    tau: Real | Literal["auto"] = "auto"
    max_policy_lag: Int = Field(1, ge=0)
    # Relative weight of each chunk as the pivot (one per chunk of the preset); None: uniform, the
    # paper's p ~ U(1..L). See docs/pocket.md for why the pocket default weighs early chunks more.
    pivot_weights: list[Real] | None = None
    adapter_name: str | None = None  # default: the mode's name
    # SDE-GRPO: stochasticity of the intermediate steps (1.0 = the sampler's own re-noise).
    sde_eta: Real = Field(1.0, gt=0, le=1.0)
    # Astrolabe NFT
    nft_beta: Real = Field(0.1, gt=0)
    nft_kl_beta: Real = Field(1e-4, ge=0)
    nft_window_chunks: Int | None = Field(None, ge=1)  # chunks trained from the pivot on; None: to the end
    # Branches per NFT micro-batch (bounds the learner's KV caches: 3 rolling contexts of this many videos).
    nft_micro_batch: Int | None = Field(None, ge=1)  # None: all valid branches of a group at once
    # Uncertainty-aware selective regularisation towards a dynamic reference adapter (replaces the base KL).
    nft_selective_reg: StrictBool = False
    nft_aux_heads: list[str] | None = None  # auxiliary rewards of the disagreement; None: every weighted head
    nft_ema_rate: Real = Field(0.001, ge=0)  # old adapter decay = min(rate * optimiser steps, max)
    nft_ema_max: Real = Field(0.5, ge=0, le=1.0)
    # Optimiser steps in a row whose loss or gradients are not finite (each one skipped) that stop the run.
    max_nonfinite_steps: Int = Field(3, ge=1)

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
    num_workers: Int = Field(2, ge=1)
    num_gpus_per_worker: Real = Field(0.0, ge=0)
    num_cpus_per_worker: Real = Field(1.0, gt=0)
    # Custom node resources each worker asks for, to pin it to its node group (deploy/: {"rollout_gpu": 1}).
    resources: dict[str, Real] = Field(default_factory=dict)
    branch_batch_size: Int | None = Field(None, ge=1)
    # "pocket:train" / "pocket:heldout" name the pocket prompt sets; anything else is a text file, one prompt a line.
    prompts: str = "pocket:train"
    eval_prompts: str = "pocket:heldout"


class RewardSettings(_Section):
    model: str = "pocket"
    options: dict[str, Any] = Field(default_factory=dict)  # passed to the reward model's factory
    weights: dict[str, Real] = Field(default_factory=lambda: {"VQ": 1.0, "MQ": 1.0, "TA": 1.0})
    advantage: Literal["weighted_sum", "per_head"] = "weighted_sum"
    num_actors: Int = Field(1, ge=1)
    num_gpus_per_actor: Real = Field(0.0, ge=0)
    resources: dict[str, Real] = Field(default_factory=dict)  # e.g. {"reward_gpu": 1}
    batch_size: Int = Field(8, ge=1)
    timeout_s: Real = Field(300.0, gt=0)
    min_valid_per_group: Int = Field(2, ge=2)

    @model_validator(mode="after")
    def _check_head_names(self) -> "RewardSettings":
        # metrics.jsonl writes a head as `reward_<head>`, beside `reward_mean` and the timing `reward_s`.
        clash = sorted(set(self.weights) & {"mean", "s"})
        if clash:
            raise ValueError(f"reward.weights: head name(s) {clash} clash with the metrics columns reward_mean / reward_s")
        return self


class ReplaySettings(_Section):
    url: str | None = None  # None: an embedded local store under the output directory
    max_queue_groups: Int = Field(256, ge=1)
    buffer_groups: Int = Field(100, ge=1)  # semi-on-policy reference buffer size
    import_buffer: Path | None = None  # reuse an exported reference buffer instead of collecting one
    export_buffer: StrictBool = True

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str | None) -> str | None:
        # Checked here so that a mistyped URL is reported redacted, before any process opens it.
        scheme = url.split("://", 1)[0].lower() if url and "://" in url else ""
        if scheme not in ("", "redis", "rediss", "file"):
            raise ValueError(f"unknown scheme {scheme!r} in {redact_secrets(url)}; use redis://, rediss:// or file://")
        return url


class RunSettings(_Section):
    iterations: Int = Field(100, ge=0)
    seed: Int = 0
    eval_every: Int = Field(10, ge=0)  # 0: evaluate only before and after training
    eval_prompts_limit: Int | None = Field(None, ge=1)
    eval_seeds: Int = Field(1, ge=1)
    checkpoint_every: Int = Field(10, ge=1)
    learner_num_gpus: Real = Field(0.0, ge=0)
    learner_resources: dict[str, Real] = Field(default_factory=dict)  # e.g. {"learner_gpu": 1}
    # Where metrics, the config, sample videos and the reward curve go (controller/trackers.py). jsonl is
    # metrics.jsonl, which resuming and reward_curve.png read, so it is always on.
    trackers: list[Literal["jsonl", "tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["jsonl", "tensorboard"])
    mlflow_tracking_uri: str | None = None  # None: a file store under the output directory (mlruns/)
    mlflow_experiment: str = "arcopo"
    wandb_project: str = "arcopo"
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: a run directory under the output, `wandb sync` later
    # Ray dashboard of a local cluster on 127.0.0.1 (None: no dashboard); ignored when attaching to RAY_ADDRESS.
    dashboard_port: Int | None = Field(8265, ge=1, le=65535)

    @model_validator(mode="after")
    def _check_trackers(self) -> "RunSettings":
        if "jsonl" not in self.trackers:
            raise ValueError("run.trackers must include jsonl: resuming and reward_curve.png read metrics.jsonl")
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"run.trackers lists a tracker twice: {self.trackers}")
        return self


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
        # A union's branches appear in the location as tags like "function-before[...]": not a field.
        field = ".".join(str(p) for p in e["loc"] if not any(c in str(p) for c in "[(")) or "<root>"
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
    if not raw.strip():
        return path, None
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key.strip()}: the value is not valid YAML ({_yaml_problem(err)})") from None


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
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}{_yaml_position(err)}: malformed YAML: {_yaml_problem(err)}") from None
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


def _yaml_position(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    return ", ".join(p for p in parts if p) or type(err).__name__


def dump_config(config: Config) -> str:
    """The config as YAML, with passwords inside URLs replaced (the file lands in the output directory)."""
    return redact_secrets(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# `scheme://user:password@host` (the user may be empty, as in redis://:password@host).
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<secret>[^@/\s]+)@")
REDACTED = "***"


def redact_secrets(text: str) -> str:
    """`text` with every password given inside a URL replaced by ***."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)


def check_reward_settings(reward: RewardSettings, algorithm: AlgorithmSettings | None = None) -> tuple[str, ...] | None:
    """Before any actor starts: the reward model must be registered, and every head `reward.weights`
    (and `algorithm.nft_aux_heads`) names must be one of the heads it declares. Returns those heads,
    or None when the model declares none without being built (then it is checked once built)."""
    from reward_service.registry import declared_heads

    try:
        heads = declared_heads(reward.model, **reward.options)
    except KeyError as err:
        raise ConfigError(f"reward.model: {err.args[0] if err.args else err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"reward.options: {err}") from None
    if heads is None:
        return None
    for field, names in (("reward.weights", list(reward.weights)),
                         ("algorithm.nft_aux_heads", list((algorithm and algorithm.nft_aux_heads) or []))):
        unknown = [h for h in names if h not in heads]
        if unknown:
            raise ConfigError(f"{field}: {', '.join(map(repr, unknown))} is not a head of reward model "
                              f"{reward.model!r} (its heads: {', '.join(heads)})")
    return heads
