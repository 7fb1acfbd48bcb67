"""A long-video AR-CoPO update's cost against the pivot's distance from the start, on the pocket world.

    python -m benchmarks.long_video_bench [--chunks 12] [--window 6] [--sink 2] [--group-size 4]
                                          [--anchors 2] [--repeats 7] [--threads 1]

The shipped pocket generator (2-frame chunks, 4 layers) runs ``--chunks`` chunks with a local window
of ``--window`` latent frames and ``--sink`` sink frames, with a LoRA adapter. For each pivot one group
is rolled out, then one AR-CoPO update is timed (context rebuild, the pivot chunk's T steps replayed
for B anchors with gradient, backward, AdamW step), side by side for:

- window: the rollout re-caches at a pivot past the first window and the learner rebuilds the context
  from the chunks up to frame W plus one re-cache forward (``policy.recache.rebuild_context``);
- full: plain streaming (``recache_at_pivot=False``); the learner re-runs every prefix chunk.

Columns: the rebuild's counted model calls and latent frames run, its time alone, and the whole
update's time (fastest of ``--repeats``, the two modes run in turn so both see the same load).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from learner.objectives.copo import copo_group_loss
from policy.lora import DEFAULT_TARGETS, attach_adapter
from policy.noise_plan import NoisePlan
from policy.pivot_replay import rebuild_prefix_cache
from pocket import domain
from pocket.preset import load_pocket_policy
from policy.rollout import rollout_group
from rollout_workers.produce import make_record
from rollout_workers.tasks import RolloutTask

MODES = ("window", "full")


def long_pocket_policy(chunks: int, window: int, sink: int, recache: bool):
    base = load_pocket_policy()
    policy = dataclasses.replace(base, num_chunks=chunks, local_window=window, sink_frames=sink, recache_at_pivot=recache)
    attach_adapter(policy.transformer, "policy", rank=8, alpha=16.0, target_modules=DEFAULT_TARGETS)
    return policy


def group_at(policy, prompt: str, pivot: int, group_size: int, seed: int = 0):
    plan = NoisePlan.from_seed(seed, policy.num_chunks, policy.frames_per_chunk, policy.latent_shape, policy.num_steps)
    text = policy.text_conditioning([prompt])
    rollout = rollout_group(policy, text, plan.fork(pivot, group_size, 0.5), record_final_latents=False)
    task = RolloutTask(group_id=f"p{pivot}", prompt=prompt, noise_seed=seed, pivot=pivot, group_size=group_size,
                       sigma=0.5, adapter_name="policy")
    rewards = {"reward": torch.linspace(-1.0, 1.0, group_size).numpy()}
    valid = torch.ones(group_size, dtype=torch.bool).numpy()
    return make_record(task, 0, rollout, policy.prompt_key(prompt), rewards, valid)


class FrameCount:
    """Latent frames (per video) through the patch embedding: what a rebuild actually runs."""

    def __init__(self, model):
        self.frames = 0
        self.handle = model.patch_embedding.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.frames += args[0].shape[2]  # [B, C, F, H, W]


class Update:
    """One group's rebuild alone and one whole AR-CoPO update, as callables, plus the rebuild's counts."""

    def __init__(self, policy, group, anchors: int) -> None:
        model = policy.transformer
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        self.policy, self.group = policy, group
        self.text = policy.text_conditioning([group.prompt])
        self.advantages = torch.linspace(-1.0, 1.0, group.group_size)
        self.anchors = torch.arange(anchors)
        calls, counter = model.forward_calls, FrameCount(model)
        self.rebuild()
        self.calls, self.frames = model.forward_calls - calls, counter.frames
        counter.handle.remove()

    def rebuild(self) -> None:
        rebuild_prefix_cache(self.policy, self.text, self.group.prefix_latents)

    def update(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        copo_group_loss(self.policy, self.group, self.advantages, self.anchors, tau=1.0, clip_eps=1e-3).loss.backward()
        self.optimizer.step()


def interleaved_min(fns, repeats: int) -> list[float]:
    """Fastest of ``repeats`` runs of each function, run in turn (A, B, A, B, ...) so all see the same load."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--window", type=int, default=6)
    parser.add_argument("--sink", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--anchors", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompt = domain.train_prompts()[0]
    policies = {m: long_pocket_policy(args.chunks, args.window, args.sink, m == "window") for m in MODES}
    f, steps = policies["window"].frames_per_chunk, policies["window"].num_steps
    print(f"pocket world, {args.chunks} chunks of {f} latent frames, window {args.window} with {args.sink} sink "
          f"frames, G={args.group_size}, {args.anchors} anchors x {steps} steps, {args.threads} thread(s), "
          f"fastest of {args.repeats}")
    print(f"{'pivot':>5} {'prefix':>6} | {'window: calls':>13} {'frames':>6} {'rebuild ms':>10} {'update ms':>9} "
          f"| {'full: calls':>11} {'frames':>6} {'rebuild ms':>10} {'update ms':>9}")
    for pivot in range(args.chunks):
        runs = [Update(policies[m], group_at(policies[m], prompt, pivot, args.group_size), args.anchors) for m in MODES]
        rebuild_w, rebuild_f = interleaved_min([r.rebuild for r in runs], args.repeats)
        update_w, update_f = interleaved_min([r.update for r in runs], args.repeats)
        w, full = runs
        print(f"{pivot:>5} {pivot * f:>6} | {w.calls:>13} {w.frames:>6} {rebuild_w * 1e3:>10.1f} {update_w * 1e3:>9.1f} "
              f"| {full.calls:>11} {full.frames:>6} {rebuild_f * 1e3:>10.1f} {update_f * 1e3:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
