"""A simulated-GPU rollout worker: the rollout actor's interface with a fixed-cost policy stand-in.

`SimulatedRolloutWorker` takes the same constructor arguments and answers the same calls as
`rollout_workers.worker.RolloutWorker` (`produce`, `set_adapter`, `info`, `evaluate`, `close`), so
`RolloutFleet(worker_cls=SimulatedRolloutWorker)` runs it through the real fleet, reward server and
replay store. Its "generation" sleeps for `compute_s` seconds a group, as a GPU-bound worker waits
on its device without using the host CPU, then builds a valid `CandidateGroup` with the configured
policy preset's geometry (so the real learner can train on it), seeded by the task: a task re-run
after a crash yields the same group under the same id.

Each branch's "video" is a tiny uint8 clip derived from its latents; it is scored through the reward
server (any registered reward, e.g. `fixed_cost` below or `pocket`), or, with `reward="stand-in"`,
by the same fixed-cost scoring inside the worker. Used by `benchmarks/scaling_bench.py` and the
fault-tolerance tests.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import ray
import torch

from replay import open_store
from replay.record import CandidateGroup
from replay.synthetic import synthetic_group
from reward_service.base import RewardModel, Video
from reward_service.multi_reward import results_to_arrays
from reward_service.registry import register_reward
from reward_service.result import RewardResult
from reward_service.server import remote_score
from rollout_workers.adapter_source import pull_current_adapter
from rollout_workers.delivery import deliver_group, valid_reward_means
from rollout_workers.settings import WorkerSettings
from rollout_workers.tasks import EvalResult, GroupSummary, RolloutTask, WorkerInfo

STAND_IN_HEADS = ("VQ", "MQ", "TA")
GEOMETRY_KEYS = ("channels", "height", "width", "frames_per_chunk", "num_chunks", "num_steps")
FIXED_COST_REWARD = "rollout_workers.simulated:fixed_cost"  # the registry name of FixedCostReward


def clip_scores(frames: np.ndarray, heads: tuple[str, ...] = STAND_IN_HEADS) -> dict[str, float]:
    """Deterministic scores in [0, 1] of one clip, one per head (a function of the pixels only)."""
    digest = hashlib.blake2b(np.ascontiguousarray(frames).tobytes(), digest_size=8 * len(heads)).digest()
    return {h: int.from_bytes(digest[8 * i : 8 * i + 8], "little") / 2.0**64 for i, h in enumerate(heads)}


class FixedCostReward(RewardModel):
    """A reward model stand-in: `cost_s` seconds per batch (sleeping, no CPU), pixel-derived scores."""

    name = "fixed_cost"

    def __init__(self, cost_s: float = 0.0, heads: tuple[str, ...] = STAND_IN_HEADS) -> None:
        if cost_s < 0:
            raise ValueError(f"fixed_cost reward: cost_s must be >= 0, got {cost_s}")
        self.cost_s = float(cost_s)
        self.heads = tuple(heads)

    def score(self, videos: list[Video], prompts: list[str]) -> dict[str, np.ndarray]:
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        time.sleep(self.cost_s)
        per_video = [clip_scores(v.frames, self.heads) for v in videos]
        return {h: np.array([s[h] for s in per_video], dtype=np.float64) for h in self.heads}


@register_reward("fixed_cost", heads=lambda cost_s=0.0, heads=STAND_IN_HEADS: tuple(heads))
def build_fixed_cost(cost_s: float = 0.0, heads: list[str] | tuple[str, ...] = STAND_IN_HEADS) -> RewardModel:
    return FixedCostReward(cost_s, tuple(heads))


def preset_geometry(preset_name: str) -> dict[str, int]:
    """The latent geometry of a policy preset, as `SimulatedRolloutWorker(geometry=...)` takes it.

    Computed once by the driver and passed to the workers, so that they never import the model code
    (a simulated worker should cost a sleep, not a diffusers import)."""
    from policy.presets import get_preset

    preset = get_preset(preset_name)
    return dict(
        channels=preset.latent_shape[0],
        height=preset.latent_shape[1],
        width=preset.latent_shape[2],
        frames_per_chunk=preset.frames_per_chunk,
        num_chunks=preset.num_chunks,
        num_steps=len(preset.sampler.denoising_step_list),
    )


class SimulatedRolloutWorker:
    def __init__(
        self,
        settings: dict,
        name: str,
        reward_server: "ray.actor.ActorHandle | None",
        store_url: str,
        adapter_source: "ray.actor.ActorHandle | None" = None,
        torch_threads: int | None = None,
        *,
        compute_s: float = 0.5,
        reward: str = "server",
        reward_cost_s: float = 0.0,
        clip_shape: tuple[int, int, int] = (4, 16, 16),
        geometry: dict[str, int] | None = None,
    ) -> None:
        if compute_s < 0 or reward_cost_s < 0:
            raise ValueError(f"compute_s and reward_cost_s must be >= 0, got {compute_s}, {reward_cost_s}")
        if reward not in ("server", "stand-in"):
            raise ValueError(f"reward must be 'server' or 'stand-in', got {reward!r}")
        if reward == "server" and reward_server is None:
            raise ValueError("reward='server' needs a reward server handle")
        self.settings = WorkerSettings.model_validate(settings)
        self.name = name
        self.compute_s = float(compute_s)
        self.clip_shape = tuple(clip_shape)
        self.geometry = dict(geometry) if geometry is not None else preset_geometry(self.settings.policy.preset)
        if sorted(self.geometry) != sorted(GEOMETRY_KEYS):
            raise ValueError(f"geometry must give exactly {GEOMETRY_KEYS}, got {sorted(self.geometry)}")
        self.adapter = self.settings.adapter_name if adapter_source is not None else None
        self.version = 0
        if adapter_source is not None:  # like the real worker: a (re)started worker pulls the current adapter
            self.set_adapter(*pull_current_adapter(adapter_source))
        self.reward_server = reward_server if reward == "server" else None
        self.stand_in = FixedCostReward(reward_cost_s) if reward == "stand-in" else None
        self.heads = tuple(ray.get(reward_server.heads.remote())) if self.reward_server is not None else STAND_IN_HEADS
        self.store = open_store(store_url)
        self.min_valid = self.settings.min_valid_per_group
        self.groups_produced = 0

    def info(self) -> WorkerInfo:
        return WorkerInfo(name=self.name, pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id(),
                          adapter=self.adapter, version=self.version, groups_produced=self.groups_produced)

    def set_adapter(self, version: int, state: dict[str, torch.Tensor], force: bool = False) -> int:
        if self.adapter is None:
            raise RuntimeError(f"worker {self.name} runs the reference policy and takes no adapter")
        if version < self.version and not force:
            return self.version  # a late broadcast of an older version is ignored, as by the real worker
        self.version = version
        return version

    # ------------------------------------------------------------------ generation stand-in
    def _clips(self, group: CandidateGroup) -> list[Video]:
        """One tiny clip per branch, a deterministic function of that branch's final pivot x0."""
        t, h, w = self.clip_shape
        clips = []
        for branch in group.pivot_x0[:, -1].float():
            flat = branch.flatten()
            idx = torch.arange(t * h * w * 3) % flat.numel()
            pixels = (torch.sigmoid(flat[idx]) * 255).to(torch.uint8).reshape(t, h, w, 3).numpy()
            clips.append(Video(pixels, fps=8.0))
        return clips

    def _score(self, videos: list[Video], prompts: list[str]) -> list[RewardResult]:
        if self.reward_server is not None:
            return remote_score(self.reward_server, videos, prompts)
        scores = self.stand_in.score(videos, prompts)
        return [RewardResult({h: float(scores[h][i]) for h in self.heads}, True) for i in range(len(videos))]

    def generate(self, task: RolloutTask) -> CandidateGroup:
        """The group the task names, after `compute_s` seconds of simulated device time."""
        num_chunks = self.geometry["num_chunks"]
        if task.pivot >= num_chunks:
            raise ValueError(f"task {task.group_id}: pivot {task.pivot} outside the policy's {num_chunks} chunks")
        time.sleep(self.compute_s)
        group = synthetic_group(
            **self.geometry,
            group_size=task.group_size,
            pivot=task.pivot,
            with_final=task.record_final_latents,
            policy_version=self.version,
            group_id=task.group_id,
            seed=task.noise_seed % 2**63,
            heads=self.heads,
        )
        return group.model_copy(
            update=dict(prompt=task.prompt, prompt_key=f"simulated:{task.prompt}", adapter_name=task.adapter_name,
                        sigma=task.sigma, exploration=task.exploration, noise_seed=task.noise_seed)
        )

    def produce(self, task: RolloutTask) -> GroupSummary:
        started_at = time.time()
        t0 = time.perf_counter()
        group = self.generate(task)
        t1 = time.perf_counter()
        results = self._score(self._clips(group), [task.prompt] * group.group_size)
        rewards, valid = results_to_arrays(results, self.heads)
        group = group.model_copy(update=dict(rewards={h: torch.from_numpy(v) for h, v in rewards.items()},
                                             reward_valid=torch.from_numpy(valid)))
        t2 = time.perf_counter()
        summary = self.store_group(group, task, rollout_s=t1 - t0, reward_s=t2 - t1)
        return summary.model_copy(update={"started_at": started_at, "finished_at": time.time()})

    def store_group(self, group: CandidateGroup, task: RolloutTask, rollout_s: float, reward_s: float) -> GroupSummary:
        t0 = time.perf_counter()
        stored, reason = deliver_group(self.store, group, task.destination, self.min_valid)
        self.groups_produced += 1
        L, G = group.num_chunks, group.group_size
        return GroupSummary(
            group_id=group.group_id,
            worker=self.name,
            prompt=group.prompt,
            pivot=group.pivot,
            policy_version=group.policy_version,
            stored=stored,
            drop_reason=reason,
            reward_means=valid_reward_means(group, self.heads),
            num_valid=int(group.reward_valid.sum()),
            forward_passes=(group.pivot + G * (L - group.pivot)) * (len(group.timesteps) + 1),
            rollout_s=rollout_s,
            decode_s=0.0,
            reward_s=reward_s,
            push_s=time.perf_counter() - t0,
        )

    def evaluate(self, prompts: list[str], seeds: list[int], keep_frames: int = 0) -> tuple[list[EvalResult], list]:
        """Held-out scores of simulated clips (one per (prompt, seed)); no frames are kept."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        clips = []
        for seed in seeds:
            time.sleep(self.compute_s / 4)
            rng = np.random.default_rng([seed, self.version])
            clips.append(Video(rng.integers(0, 256, (*self.clip_shape, 3), dtype=np.uint8), fps=8.0))
        results = self._score(clips, list(prompts)) if clips else []
        out = [
            EvalResult(prompt=p, seed=s, policy_version=self.version, rewards=dict(r.scores), valid=r.valid, reason=r.reason or "")
            for p, s, r in zip(prompts, seeds, results)
        ]
        return out, []

    def close(self) -> None:
        self.store.close()
