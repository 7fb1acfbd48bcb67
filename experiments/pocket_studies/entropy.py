"""Where a streaming generator's randomness lives (the paper's Figure 6 study, as a table).

For each seed, all random draws of a rollout are frozen (a ``NoisePlan``); then, per chunk position
``c``, exactly one draw is replaced by a fresh one: chunk ``c``'s initial noise, or the re-noise draw
used after denoising step ``k`` of chunk ``c``. The change of the output from frame ``c * f`` on
(earlier chunks cannot change) is measured against the frozen reference:

- ``rel L2 = ||x - x_ref|| / ||x_ref||`` over those latent frames,
- ``mean |dx|`` the mean absolute latent difference there,

averaged over seeds. A near-deterministic few-step model (the paper's claim for Self-Forcing) shows
large changes for the initial noise and small ones for every re-noise draw.

    python -m experiments.pocket_studies.entropy --preset pocket --seeds 8
    python -m experiments.pocket_studies.entropy --preset self-forcing-1.3b --checkpoint-path ... --text-encoder-path ... \
        --vae-path ... --device cuda --prompts "a red fox running through snow"
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall shared CPUs

import argparse
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class EntropyTable:
    """``initial[c]`` and ``renoise[c][k]`` hold ``(rel_l2, mean_abs)`` averaged over seeds."""

    initial: list[tuple[float, float]]
    renoise: list[list[tuple[float, float]]]
    seeds: int

    def markdown(self) -> str:
        steps = len(self.renoise[0]) if self.renoise else 0
        head = ["chunk", "initial noise"] + [f"re-noise after step {k + 1}" for k in range(steps)] + ["initial / mean re-noise"]
        lines = [
            f"Relative L2 change of the output from the chunk on (mean abs latent change in brackets), {self.seeds} seeds.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for c, (init, renoise) in enumerate(zip(self.initial, self.renoise)):
            mean_renoise = float(np.mean([r[0] for r in renoise])) if renoise else float("nan")
            cells = [str(c), f"{init[0]:.4f} ({init[1]:.4f})"] + [f"{r[0]:.4f} ({r[1]:.4f})" for r in renoise]
            cells.append(f"{init[0] / max(mean_renoise, 1e-12):.1f}x")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _change(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (x - ref).double()
    return float(d.norm() / ref.double().norm().clamp_min(1e-12)), float(d.abs().mean())


@torch.no_grad()
def noise_entropy_table(policy, prompts: list[str], seeds: list[int], fresh_offset: int = 1_000_003) -> EntropyTable:
    """The study for ``policy`` (any ``StreamingVideoPolicy``); prompt ``i % len(prompts)`` for seed ``i``."""
    from policy.generation import generate_from_noise, plans_for_seeds, text_for

    chunks, steps, f = policy.num_chunks, policy.num_steps, policy.frames_per_chunk
    initial_acc = np.zeros((chunks, 2))
    renoise_acc = np.zeros((chunks, max(steps - 1, 0), 2))
    for i, seed in enumerate(seeds):
        base = plans_for_seeds(policy, [seed])[0]
        fresh = plans_for_seeds(policy, [seed + fresh_offset])[0]
        inits, renoises, labels = [base.initial], [base.renoise], [None]
        for c in range(chunks):
            init = base.initial.clone()
            init[c] = fresh.initial[c]
            inits.append(init)
            renoises.append(base.renoise)
            labels.append(("initial", c, None))
            for k in range(steps - 1):
                ren = base.renoise.clone()
                ren[c, k] = fresh.renoise[c, k]
                inits.append(base.initial)
                renoises.append(ren)
                labels.append(("renoise", c, k))
        text = text_for(policy, [prompts[i % len(prompts)]]).expand(len(inits), -1, -1)
        latents = []
        for lo in range(0, len(inits), 32):
            latents.append(
                generate_from_noise(policy, text[lo : lo + 32], torch.stack(inits[lo : lo + 32]), torch.stack(renoises[lo : lo + 32]))
            )
        latents = torch.cat(latents)
        ref = latents[0]
        for label, x in zip(labels[1:], latents[1:]):
            kind, c, k = label
            change = _change(x[c * f :], ref[c * f :])
            if kind == "initial":
                initial_acc[c] += change
            else:
                renoise_acc[c, k] += change
    n = len(seeds)
    return EntropyTable(
        initial=[tuple(v / n) for v in initial_acc],
        renoise=[[tuple(v / n) for v in row] for row in renoise_acc],
        seeds=n,
    )


def load_policy(args) -> object:
    from policy.presets import build_policy, get_preset, preset_loader

    loader = preset_loader(args.preset)
    if loader is not None:  # a preset with its own weights format (the pocket world's)
        return loader(args.weights, device=args.device)
    preset = get_preset(args.preset)
    paths = {k: getattr(args, k) for k in ("checkpoint_path", "text_encoder_path", "vae_path", "lora_path") if getattr(args, k)}
    return build_policy(preset.with_paths(**paths) if paths else preset, device=args.device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pocket")
    parser.add_argument("--weights", default=None, help="weights directory of a preset with its own loader (the pocket preset)")
    parser.add_argument("--checkpoint-path", default=None)
    parser.add_argument("--text-encoder-path", default=None)
    parser.add_argument("--vae-path", default=None)
    parser.add_argument("--lora-path", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=8, help="number of frozen noise plans (seeds 0..N-1)")
    parser.add_argument("--prompts", nargs="+", default=None, help="default: held-out pocket prompts")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)

    if args.prompts is None:
        from pocket import domain

        args.prompts = domain.heldout_prompts()[::5]
    policy = load_policy(args)
    table = noise_entropy_table(policy, args.prompts, list(range(args.seeds)))
    text = f"Preset `{args.preset}`.\n\n" + table.markdown()
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
