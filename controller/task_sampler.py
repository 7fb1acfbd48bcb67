"""Which groups an iteration asks for: prompt, noise seed and pivot chunk, reproducibly.

The driver owns all sampling randomness (the single controller): tasks depend only on the run seed,
the iteration and the prompt list, never on how many workers there are or which one runs a task.
A task's `group_id` is derived from the same inputs, so a task re-run after a crash produces a group
with the same id, which the replay store and the learner apply at most once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from controller.config import Config
from policy.plugins import prompt_set, prompt_set_names
from rollout_workers.tasks import RolloutTask


def load_prompts(spec: str) -> list[str]:
    """A prompt set a plug-in registers (`pocket:train`, `pocket:heldout`), or a text file with one prompt
    a line (blank lines and # comments skipped)."""
    prompts = prompt_set(spec)
    if prompts is not None:
        return prompts
    path = Path(spec)
    known = prompt_set_names()
    if not path.is_file() and spec.partition(":")[0] in {name.partition(":")[0] for name in known}:
        raise ValueError(f"unknown prompt set {spec!r} (rollout.prompts / rollout.eval_prompts); known: {known}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {spec!r} not found (rollout.prompts / rollout.eval_prompts)")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {spec!r} holds no prompt")
    return prompts


class TaskSampler:
    def __init__(self, config: Config, prompts: list[str], num_chunks: int, run_tag: str = "run"):
        if not prompts:
            raise ValueError("no training prompts")
        self.config = config
        self.prompts = prompts
        self.num_chunks = num_chunks
        self.run_tag = run_tag
        weights = config.algorithm.pivot_weights
        if weights is not None and len(weights) != num_chunks:
            raise ValueError(
                f"algorithm.pivot_weights has {len(weights)} entries but the policy has {num_chunks} chunks (one weight per chunk)"
            )
        self.pivot_probs = None if weights is None else np.asarray(weights, dtype=np.float64) / float(sum(weights))

    def _pivot(self, rng: np.random.Generator) -> int:
        if self.pivot_probs is None:
            return int(rng.integers(self.num_chunks))  # the paper's p ~ U(1..L)
        return int(rng.choice(self.num_chunks, p=self.pivot_probs))

    def tasks(self, iteration: int, count: int, kind: str = "it") -> list[RolloutTask]:
        """`count` tasks for `iteration`; pivot ~ `algorithm.pivot_weights` over the L chunks, uniform
        (the paper's p ~ U(1..L)) when those are not set."""
        alg = self.config.algorithm
        rng = np.random.default_rng([self.config.run.seed, iteration, 0 if kind == "it" else 1])
        exploration = "renoise" if alg.objective == "sde_grpo" else "initial_noise"
        tasks = []
        for k in range(count):
            tasks.append(
                RolloutTask(
                    group_id=f"{self.run_tag}-{kind}{iteration:06d}-{k:04d}",
                    prompt=self.prompts[int(rng.integers(len(self.prompts)))],
                    noise_seed=int(rng.integers(2**62)),
                    pivot=self._pivot(rng),
                    group_size=alg.group_size,
                    sigma=alg.perturbation_sigma,
                    exploration=exploration,
                    adapter_name=alg.effective_adapter_name,
                    destination="queue" if alg.mode == "on_policy" else "buffer",
                    record_final_latents=alg.objective == "nft",
                )
            )
        return tasks

    def next_tasks(self, iteration: int, count: int) -> list[RolloutTask]:
        """The tasks of the iteration after `iteration` (what pipelining starts early); none after the
        run's last iteration."""
        if iteration + 1 >= self.config.run.iterations:
            return []
        return self.tasks(iteration + 1, count)

    def reference_tasks(self, count: int) -> list[RolloutTask]:
        """The semi-on-policy buffer's groups (collected once from the reference policy)."""
        return self.tasks(0, count, kind="ref")


def eval_set(prompts: list[str], seeds_per_prompt: int, limit: int | None, seed: int) -> tuple[list[str], list[int]]:
    """Fixed held-out (prompt, seed) pairs, the same at every evaluation of a run."""
    chosen = prompts[:limit] if limit else prompts
    pairs = [(p, 10_000 * seed + 97 * i + j) for i, p in enumerate(chosen) for j in range(seeds_per_prompt)]
    return [p for p, _ in pairs], [s for _, s in pairs]
