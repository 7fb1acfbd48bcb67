"""How much of a real chunk each denoising step reads from its input.

For real first chunks ``E`` of a prompt (rendered domain scenes, encoded), each sampler step ``k`` is
fed what ODE-trajectory regression trains it on: ``x = (1 - sigma_k) E + sigma_k xi`` with fresh
``xi`` (pure noise at the first step). Per step, over prompts, scenes and noises:

- ``x0 error``: mean squared error of the step's x0 prediction to the scene ``E``;
- ``mean-video error``: the error of the per-prompt mean scene, i.e. of a step that reads nothing of
  its input but the prompt (a step below it recovers the scene from what its input shows);
- ``spread over noise``: variance of the prediction across ``xi`` for one scene, as a fraction of the
  variance across scenes. A large spread at a step means that step's noise, not the scene, sets
  the output: where the sampler's re-noise draws take over from the chunk's initial noise.

    python -m experiments.pocket_studies.step_readout
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall shared CPUs

import argparse
from dataclasses import dataclass

import torch

from policy.pipeline import StreamingVideoPolicy
from pocket import domain


@dataclass(frozen=True)
class StepReadout:
    timestep: float
    sigma: float
    x0_error: float
    mean_video_error: float
    spread_over_noise: float  # variance across noises / variance across scenes


@torch.no_grad()
def step_readout(
    policy: StreamingVideoPolicy, prompts: list[str], scenes: int = 8, noises: int = 8, seed: int = 0
) -> list[StepReadout]:
    """One row per sampler step, for the first chunk of ``scenes`` real videos (seeds ``seed..``) per prompt."""
    if scenes < 2 or noises < 2:
        raise ValueError(f"scenes and noises must be at least 2 (got {scenes}, {noises})")
    f = policy.frames_per_chunk
    real = torch.stack(
        [policy.codec.encode(domain.generate_batch([p] * scenes, range(seed, seed + scenes)))[:, :f] for p in prompts]
    ).to(policy.device, policy.dtype)  # [P, scenes, f, C, H, W]
    text = policy.text_conditioning(prompts)
    gen = torch.Generator().manual_seed(seed)
    mean_video_error = float((real - real.mean(1, keepdim=True)).pow(2).mean())
    scene_var = float(real.var(1).mean())
    rows = []
    for t in policy.sampler.timesteps().tolist():
        sigma = t / policy.sampler.num_train_timesteps
        preds = []
        for i in range(len(prompts)):
            xi = torch.randn((scenes, noises, *real.shape[2:]), generator=gen).to(real)
            x = ((1 - sigma) * real[i, :, None] + sigma * xi).flatten(0, 1)
            times = torch.full((x.shape[0], f), t, device=policy.device, dtype=policy.dtype)
            flow = policy.transformer.forward_dense(x, times, text[i : i + 1].expand(x.shape[0], -1, -1), f)
            preds.append((x - sigma * flow).view(scenes, noises, *real.shape[2:]))
        pred = torch.stack(preds)  # [P, scenes, noises, ...]
        rows.append(
            StepReadout(
                timestep=t,
                sigma=sigma,
                x0_error=float((pred - real[:, :, None]).pow(2).mean()),
                mean_video_error=mean_video_error,
                spread_over_noise=float(pred.var(2).mean()) / max(scene_var, 1e-12),
            )
        )
    return rows


def markdown(rows: list[StepReadout]) -> str:
    lines = [
        "| step | t | sigma | x0 error | mean-video error | error / mean-video | spread over noise / over scenes |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(rows):
        lines.append(
            f"| {k + 1} | {r.timestep:.1f} | {r.sigma:.4f} | {r.x0_error:.3f} | {r.mean_video_error:.3f} | "
            f"{r.x0_error / r.mean_video_error:.2f} | {r.spread_over_noise:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from pocket import load_pocket_policy

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="pocket weights directory (default: the shipped weights)")
    parser.add_argument("--prompts", type=int, default=8, help="training prompts, evenly spaced over the list")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--noises", type=int, default=8)
    args = parser.parse_args(argv)
    policy = load_pocket_policy(args.weights) if args.weights else load_pocket_policy()
    train = domain.train_prompts()
    prompts = train[:: max(1, len(train) // args.prompts)][: args.prompts]
    rows = step_readout(policy, prompts, args.scenes, args.noises)
    print(f"First chunk of {args.scenes} real scenes x {args.noises} noises for each of {len(prompts)} training prompts\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
