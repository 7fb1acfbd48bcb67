"""One candidate group, end to end, as plain functions: fork, roll out, decode, score, make the record.

The rollout worker actor wraps these with a policy, a reward client and a replay store; tests call
them directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from policy.noise_plan import NoisePlan
from policy.pipeline import StreamingVideoPolicy
from policy.recache import PromptSchedule, encode_schedule
from policy.rollout import GroupRollout, generate, rollout_group
from replay.record import CandidateGroup
from reward_service.base import Video
from reward_service.multi_reward import results_to_arrays
from reward_service.result import RewardResult
from rollout_workers.tasks import RolloutTask

ScoreFn = Callable[[list[Video], list[str]], Sequence[RewardResult]]
# Sends videos to be scored and returns at once; what it returns gives their results when called.
SubmitScoreFn = Callable[[list[Video], list[str]], Callable[[], Sequence[RewardResult]]]


@dataclass
class ProducedGroup:
    group: CandidateGroup
    rollout_s: float
    decode_s: float
    reward_s: float
    forward_passes: int


def noise_plan_for(policy: StreamingVideoPolicy, seed: int) -> NoisePlan:
    return NoisePlan.from_seed(seed, policy.num_chunks, policy.frames_per_chunk, policy.latent_shape, policy.num_steps)


def fork_group(policy: StreamingVideoPolicy, task: RolloutTask, branch_batch_size: int | None = None) -> GroupRollout:
    if task.pivot >= policy.num_chunks:
        raise ValueError(f"task {task.group_id}: pivot {task.pivot} outside the policy's {policy.num_chunks} chunks")
    plan = noise_plan_for(policy, task.noise_seed)
    if task.exploration == "initial_noise":
        group_plan = plan.fork(task.pivot, task.group_size, task.sigma)
    else:
        group_plan = plan.fork_renoise(task.pivot, task.group_size)
    if task.prompt_schedule is not None:
        text = encode_schedule(policy, task.prompt_schedule)
    else:
        text = policy.text_conditioning([task.prompt])
    return rollout_group(policy, text, group_plan, task.record_final_latents, branch_batch_size)


def eval_latents(
    policy: StreamingVideoPolicy, prompt: str, seed: int, prompt_schedule: PromptSchedule | None = None
) -> torch.Tensor:
    """One held-out video ``[F, C, H, W]``: ``prompt`` throughout, or the schedule's prompts per chunk."""
    text = policy.text_conditioning([prompt]) if prompt_schedule is None else encode_schedule(policy, prompt_schedule)
    return generate(policy, text, noise_plan_for(policy, seed)).latents


def decode_videos(policy: StreamingVideoPolicy, latents: torch.Tensor, batch_size: int | None = None) -> list[Video]:
    """Each video's frames, decoded `batch_size` videos at a time (None: all at once). The VAE's
    activations grow with the batch: at 480p, 12 videos at once need ~49 GiB, one ~4 GiB."""
    step = batch_size or len(latents)
    videos = []
    for lo in range(0, len(latents), step):
        frames = policy.decode(latents[lo : lo + step])
        videos += [Video(np.ascontiguousarray(f), policy.fps) for f in frames]
    return videos


def decode_and_score(
    policy: StreamingVideoPolicy, latents: torch.Tensor, prompt: str, submit: SubmitScoreFn, batch_size: int | None = None
) -> tuple[list[RewardResult], float, float]:
    """Decode `batch_size` videos at a time and send each batch to be scored as soon as it is decoded,
    so scoring overlaps the decoding of the next batch; gather every result at the end. Returns the
    results in video order, the decoding seconds and the seconds then spent waiting for the scores."""
    step = batch_size or len(latents)
    pending, decode_s = [], 0.0
    for lo in range(0, len(latents), step):
        t0 = time.perf_counter()
        videos = decode_videos(policy, latents[lo : lo + step])
        decode_s += time.perf_counter() - t0
        pending.append((len(videos), submit(videos, [prompt] * len(videos))))
    t0 = time.perf_counter()
    results = []
    for count, fetch in pending:
        batch = list(fetch())
        if len(batch) != count:
            raise RuntimeError(f"reward service returned {len(batch)} results for {count} videos")
        results += batch
    return results, decode_s, time.perf_counter() - t0


def make_record(
    task: RolloutTask,
    policy_version: int,
    rollout: GroupRollout,
    prompt_key: str,
    rewards: dict[str, np.ndarray],
    valid: np.ndarray,
) -> CandidateGroup:
    cpu = lambda t: None if t is None else t.detach().to("cpu").contiguous()  # noqa: E731
    return CandidateGroup(
        group_id=task.group_id,
        prompt=task.prompt,
        prompt_key=prompt_key,
        adapter_name=task.adapter_name,
        policy_version=policy_version,
        pivot=rollout.pivot,
        num_chunks=rollout.num_chunks,
        group_size=rollout.group_size,
        sigma=rollout.sigma,
        noise_seed=task.noise_seed,
        exploration=rollout.exploration,
        schedule_chunks=[c for c, _ in task.prompt_schedule or ()],
        schedule_prompts=[p for _, p in task.prompt_schedule or ()],
        prefix_latents=cpu(rollout.prefix_latents),
        timesteps=cpu(rollout.timesteps).float(),
        pivot_inputs=cpu(rollout.pivot_inputs),
        pivot_x0=cpu(rollout.pivot_x0),
        final_latents=cpu(rollout.final_latents),
        rewards={h: torch.from_numpy(v) for h, v in rewards.items()},
        reward_valid=torch.from_numpy(valid),
    )


def produce_group(
    policy: StreamingVideoPolicy,
    task: RolloutTask,
    policy_version: int,
    score: ScoreFn,
    heads: tuple[str, ...],
    branch_batch_size: int | None = None,
    decode_batch_size: int | None = None,
    submit_score: SubmitScoreFn | None = None,
) -> ProducedGroup:
    """Fork at the task's pivot, complete every branch, decode each once, score, build the record.

    With `submit_score` the videos are scored as they are decoded (`decode_and_score`); else, once all
    are decoded, by `score`; `reward_s` is the time spent waiting for the scores after decoding."""
    t0 = time.perf_counter()
    rollout = fork_group(policy, task, branch_batch_size)
    t1 = time.perf_counter()
    if submit_score is not None:
        results, decode_s, reward_s = decode_and_score(policy, rollout.latents, task.prompt, submit_score, decode_batch_size)
    else:
        videos = decode_videos(policy, rollout.latents, decode_batch_size)
        t2 = time.perf_counter()
        results = score(videos, [task.prompt] * len(videos))
        if len(results) != len(videos):
            raise RuntimeError(f"reward service returned {len(results)} results for {len(videos)} videos")
        decode_s, reward_s = t2 - t1, time.perf_counter() - t2
    rewards, valid = results_to_arrays(results, heads)
    record = make_record(task, policy_version, rollout, policy.prompt_key(task.prompt), rewards, valid)
    return ProducedGroup(record, t1 - t0, decode_s, reward_s, rollout.forward_passes)
