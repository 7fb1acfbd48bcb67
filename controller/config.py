"""The run configuration: the driver's `Config` composes the settings section each package owns,
loaded from YAML plus dotted command-line overrides.

Sections: `policy`, `lora` (policy/settings.py), `algorithm` (learner/settings.py), `rollout`
(rollout_workers/settings.py), `reward` (reward_service/settings.py), `replay` (replay/settings.py)
and `run` (here: the controller's own). Defaults are the paper's settings (AR-CoPO, Sec. 5.1);
`configs/pocket.yaml` adapts them to the pocket world on a CPU, and `pocket_default()` returns exactly
that file's contents, so `python -m learner.main` with no config runs the pocket default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from learner.settings import AlgorithmSettings, LearnerRunSettings, LearnerSettings
from policy.settings import LoraSettings, PolicySettings
from policy.settings_types import Int, Real, Section
from replay.settings import REDACTED, ReplaySettings, redact_secrets
from reward_service.settings import RewardSettings
from rollout_workers.settings import RolloutSettings, WorkerSettings

__all__ = [
    "CONFIG_DIR", "POCKET_CONFIG", "REDACTED", "AlgorithmSettings", "Config", "ConfigError", "LoraSettings",
    "PolicySettings", "ReplaySettings", "RewardSettings", "RolloutSettings", "RunSettings", "check_reward_settings",
    "dump_config", "load_config", "parse_override", "pocket_default", "redact_secrets",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
POCKET_CONFIG = CONFIG_DIR / "pocket.yaml"


class RunSettings(Section):
    iterations: Int = Field(100, ge=0)
    seed: Int = 0
    eval_every: Int = Field(10, ge=0)  # 0: evaluate only before and after training
    eval_prompts_limit: Int | None = Field(None, ge=1)
    eval_seeds: Int = Field(1, ge=1)
    checkpoint_every: Int = Field(10, ge=1)
    # Data-parallel learner ranks, each with learner_num_gpus and learner_resources (docs/operations.md).
    num_learners: Int = Field(1, ge=1)
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


class Config(Section):
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

    @model_validator(mode="after")
    def _check_learner_group(self) -> "Config":
        if self.run.num_learners > 1 and self.algorithm.objective == "nft":
            raise ValueError("run.num_learners > 1 needs algorithm.objective copo or sde_grpo: NFT's EMA and "
                             "selective statistics are taken over the whole batch on one learner")
        return self

    def learner_settings(self) -> LearnerSettings:
        """The sections the learner actor reads."""
        run = self.run
        return LearnerSettings(policy=self.policy, lora=self.lora, algorithm=self.algorithm, reward=self.reward,
                               run=LearnerRunSettings(seed=run.seed, checkpoint_every=run.checkpoint_every,
                                                      num_learners=run.num_learners, num_gpus=run.learner_num_gpus,
                                                      resources=run.learner_resources))

    def worker_settings(self) -> WorkerSettings:
        """The sections a rollout worker reads."""
        return WorkerSettings(policy=self.policy, lora=self.lora, rollout=self.rollout,
                              adapter_name=self.algorithm.effective_adapter_name,
                              min_valid_per_group=self.reward.min_valid_per_group)


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
