"""Policy speed, measured side by side in one run on a tiny and a mid-size random policy.

    python -m benchmarks.policy_bench [--presets tiny mid] [--group-size 4] [--repeats 3]

Prints, per preset (each line is two timings taken back to back and their ratio):
- forked group vs G independent rollouts of the same branches (and the counted forward-pass ratio
  ``(pivot + G (L - pivot)) / (G L)`` it should approach),
- G branches batched in one call vs run one after another,
- one denoising step of the last chunk with the KV cache vs recomputing the prefix (a dense
  block-causal forward over prefix + chunk).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from policy.noise_plan import NoisePlan
from policy.presets import build_policy, get_preset
from policy.rollout import generate, rollout_group


class _ZeroText:
    encoder_id = "bench-zero-text"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, prompts: list[str]) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(len(prompts), 16, self.dim, generator=g)


def _paired_times(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Medians of A and B timed alternately (A, B, A, B, ...) so both see the same machine load."""
    fn_a(), fn_b()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, a), (fn_b, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def bench_preset(name: str, group_size: int, repeats: int) -> list[tuple[str, float, float, str]]:
    preset = get_preset(name)
    policy = build_policy(preset, text_encoder=_ZeroText(preset.transformer["text_dim"]))
    text = policy.text_conditioning(["benchmark prompt"])
    L, f = policy.num_chunks, policy.frames_per_chunk
    pivot = L // 2
    plan = NoisePlan.from_seed(0, L, f, policy.latent_shape, policy.num_steps)
    group_plan = plan.fork(pivot, group_size, 0.5)
    rows = []

    with torch.no_grad():
        forked, independent = _paired_times(
            lambda: rollout_group(policy, text, group_plan),
            lambda: [generate(policy, text, group_plan.branch(i)) for i in range(group_size)],
            repeats,
        )
        counted = (pivot + group_size * (L - pivot)) / (group_size * L)
        rows.append((f"forked group vs {group_size} independent rollouts", forked, independent,
                     f"counted forward ratio {counted:.3f} (pivot {pivot}, L {L})"))

        batched, sequential = _paired_times(
            lambda: rollout_group(policy, text, group_plan),
            lambda: rollout_group(policy, text, group_plan, branch_batch_size=1),
            repeats,
        )
        rows.append((f"{group_size} branches batched vs sequential", batched, sequential, "same forward count"))

        model = policy.transformer
        last = (L - 1) * f
        clean = generate(policy, text, plan).latents[None]
        cache = policy.new_cache(1)
        for start in range(0, last, f):
            model.forward_chunk(clean[:, start : start + f], torch.zeros(1, f), cache, start, text)
        chunk = plan.initial[-1][None]
        t_step = policy.timesteps()[1]
        frames = torch.cat([clean[:, :last], chunk], dim=1)
        per_frame_t = torch.cat([torch.zeros(1, last), t_step.expand(1, f)], dim=1)
        cached, dense = _paired_times(
            lambda: model.forward_chunk(chunk, t_step.expand(1, f), cache, last, text),
            lambda: model.forward_dense(frames, per_frame_t, text, f, local_window=policy.local_window,
                                        sink_frames=policy.sink_frames),
            repeats * 3,
        )
        rows.append(("last-chunk step: KV cache vs recompute prefix", cached, dense,
                     f"{last} cached frames + {f}-frame chunk"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; A and B timed alternately, median of {args.repeats}+ pairs")
    print(f"{'preset':<8} {'measurement':<48} {'A (s)':>9} {'B (s)':>9} {'A/B':>7}  note")
    for name in args.presets:
        preset = get_preset(name)
        cfg = preset.transformer
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        print(f"# {name}: dim {dim}, {cfg['num_layers']} layers, latent {preset.latent_shape}, "
              f"{preset.num_chunks} chunks x {preset.frames_per_chunk} frames, {preset.sampler.num_steps} steps")
        for label, a, b, note in bench_preset(name, args.group_size, args.repeats):
            print(f"{name:<8} {label:<48} {a:>9.4f} {b:>9.4f} {a / b:>7.3f}  {note}")


if __name__ == "__main__":
    main()
