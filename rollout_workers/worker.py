"""The rollout worker: a Ray actor holding one policy on its device.

It runs either the frozen reference policy (no adapter) or the current policy (base + the run's
adapter at the version the learner last broadcast). A restarted worker re-runs `__init__`, which
pulls the current adapter from the learner before it generates anything: its state is rebuilt from
the learner, never from its own memory.
"""

from __future__ import annotations

import logging
import os
import time

import ray
import torch

from policy.factory import add_adapter, build_configured_policy
from policy.lora import import_adapter_state
from replay import open_store
from reward_service.base import Video
from reward_service.server import remote_score
from rollout_workers.adapter_source import pull_current_adapter
from rollout_workers.delivery import deliver_group, valid_reward_means
from rollout_workers.produce import decode_videos, eval_latents, produce_group
from rollout_workers.settings import WorkerSettings
from rollout_workers.tasks import EvalResult, GroupSummary, RolloutTask, WorkerInfo

log = logging.getLogger(__name__)


class RolloutWorker:
    def __init__(
        self,
        settings: dict,
        name: str,
        reward_server: "ray.actor.ActorHandle",
        store_url: str,
        adapter_source: "ray.actor.ActorHandle | None" = None,
        torch_threads: int | None = None,
    ) -> None:
        self.settings = WorkerSettings.model_validate(settings)
        self.name = name
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.policy = build_configured_policy(self.settings.policy)
        self.adapter = self.settings.adapter_name if adapter_source is not None else None
        self.version = 0
        if self.adapter is not None:
            add_adapter(self.policy, self.adapter, self.settings.lora, train=False)
            self.set_adapter(*pull_current_adapter(adapter_source))
        self.reward_server = reward_server
        self.heads: tuple[str, ...] = tuple(ray.get(reward_server.heads.remote()))
        self.store = open_store(store_url)
        self.min_valid = self.settings.min_valid_per_group
        log.info("rollout worker %s ready (pid %d, adapter %s v%d)", name, os.getpid(), self.adapter, self.version)

    def info(self) -> WorkerInfo:
        return WorkerInfo(name=self.name, pid=os.getpid(), adapter=self.adapter, version=self.version)

    def set_adapter(self, version: int, state: dict[str, torch.Tensor], force: bool = False) -> int:
        """Load adapter weights broadcast by the learner (only LoRA tensors cross the network).

        A late broadcast of an older version is ignored, unless `force` (the learner was restored
        from an older checkpoint, and its adapter is the one to hold)."""
        if self.adapter is None:
            raise RuntimeError(f"worker {self.name} runs the reference policy and takes no adapter")
        if version < self.version and not force:
            return self.version
        import_adapter_state(self.policy.transformer, self.adapter, state)
        self.version = version
        return version

    def _score(self, videos: list[Video], prompts: list[str]):
        return remote_score(self.reward_server, videos, prompts)

    def _submit_score(self, videos: list[Video], prompts: list[str]):
        """Send a decoded batch to the reward pool now; the returned call waits for its results."""
        ref = self.reward_server.score_ref.remote([ray.put(videos)], prompts)
        return lambda: ray.get(ref)

    def produce(self, task: RolloutTask) -> GroupSummary:
        started_at = time.time()
        produced = produce_group(self.policy, task, self.version, self._score, self.heads,
                                 self.settings.rollout.branch_batch_size, self.settings.rollout.decode_batch_size,
                                 submit_score=self._submit_score)
        group = produced.group
        t0 = time.perf_counter()
        stored, reason = deliver_group(self.store, group, task.destination, self.min_valid)
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
            forward_passes=produced.forward_passes,
            rollout_s=produced.rollout_s,
            decode_s=produced.decode_s,
            reward_s=produced.reward_s,
            push_s=time.perf_counter() - t0,
            started_at=started_at,
            finished_at=time.time(),
        )

    @torch.no_grad()
    def evaluate(
        self,
        prompts: list[str],
        seeds: list[int],
        keep_frames: int = 0,
        prompt_schedules: list[list[tuple[int, str]] | None] | None = None,
    ) -> tuple[list[EvalResult], list]:
        """Generate one video per (prompt, seed) with the current policy and score it against the prompt.

        `prompt_schedules[i]`, when given and not None, generates video i with those prompts per chunk
        (LongLive's switches with KV re-cache). Returns the results and the decoded frames of the first
        `keep_frames` videos (for samples).
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        schedules = prompt_schedules or [None] * len(prompts)
        if len(schedules) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(schedules)} prompt_schedules")
        videos = []
        for prompt, seed, schedule in zip(prompts, seeds, schedules):
            videos.extend(decode_videos(self.policy, eval_latents(self.policy, prompt, seed, schedule)[None]))
        results = self._score(videos, list(prompts)) if videos else []
        out = [
            EvalResult(prompt=p, seed=s, policy_version=self.version, rewards=dict(r.scores), valid=r.valid, reason=r.reason or "")
            for p, s, r in zip(prompts, seeds, results)
        ]
        return out, [v.frames for v in videos[:keep_frames]]

    def close(self) -> None:
        self.store.close()

