"""Baseline scores of the pocket generator and of real domain videos; writes results/pocket_baseline.md.

    python -m experiments.pocket_studies.baseline                       # shipped weights, 2 videos per held-out prompt
    python -m experiments.pocket_studies.baseline --weights DIR --out results/other.md

Rows: real domain videos, the same videos encoded and decoded by the codec (what a perfect generator
in its latent space would show), the generator on the 72 held-out prompts (unseen colour/shape/direction
combinations) and on 72 training prompts, and two corrupted copies of the real videos that calibrate
the out-of-domain metric. Columns: the verifier heads (mean over videos, std in brackets),
their sum (VideoAlign's "Overall"), and FVD-p, the Frechet distance to real videos of the same prompts
(``pocket.ood_metric``; lower is better). Then every verifier term, and the noise-entropy table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall shared CPUs

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np


def score_set(videos: list[np.ndarray], prompts: list[str]) -> dict:
    from pocket import ood_metric, verifiers

    terms = [verifiers.score_terms(v, p) for v, p in zip(videos, prompts)]
    heads = {h: np.array([np.mean(list(t[h].values())) for t in terms]) for h in verifiers.HEADS}
    flat = {f"{h}.{k}": np.array([t[h][k] for t in terms]) for h in verifiers.HEADS for k in terms[0][h]}
    return {
        "heads": heads,
        "overall": sum(heads.values()),
        "terms": flat,
        "fvd": ood_metric.pocket_fvd(np.stack(videos), prompts),
    }


def _cell(x: np.ndarray) -> str:
    return f"{x.mean():.3f} ({x.std():.3f})"


def render_report(rows: dict[str, dict], header: str, entropy_md: str | None) -> str:
    lines = [header, "", "## Scores", "",
             "| videos | n | TA | VQ | MQ | Overall (TA+VQ+MQ) | FVD-p (lower is better) |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        h = r["heads"]
        lines.append(f"| {name} | {len(h['TA'])} | {_cell(h['TA'])} | {_cell(h['VQ'])} | {_cell(h['MQ'])} | "
                     f"{_cell(r['overall'])} | {r['fvd']:.2f} |")
    names = list(next(iter(rows.values()))["terms"])
    lines += ["", "## Verifier terms (means)", "", "| videos | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['terms'][k].mean():.3f}" for k in names) + " |")
    if entropy_md:
        lines += ["", "## Where the randomness lives (Figure 6 study)", "",
                  "Each cell: replace exactly one random draw of a frozen rollout and measure the output's change",
                  "from that chunk on. Command: `python -m experiments.pocket_studies.entropy --preset pocket`.", "", entropy_md]
    return "\n".join(lines) + "\n"


def _training_lines(training: dict, indent: str = "") -> list[str]:
    """The training record as bullet lines; weights trained from earlier weights list those first."""
    lines = []
    if training.get("initial_weights"):
        lines += [f"{indent}- started from weights trained as:"] + _training_lines(training["initial_weights"], indent + "  ")
    losses = {k: round(v, 4) for k, v in training.items() if k.endswith("_final") and v is not None}
    lines.append(f"{indent}- training: wall time {training.get('wall_time')}, final losses {losses}, "
                 f"seed {training.get('config', {}).get('seed')}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="pocket weights directory (default: the shipped weights)")
    parser.add_argument("--per-prompt", type=int, default=2, help="videos per held-out prompt")
    parser.add_argument("--entropy-seeds", type=int, default=8, help="seeds of the entropy study (0 skips it)")
    parser.add_argument("--out", default="results/pocket_baseline.md")
    args = parser.parse_args(argv)

    from pocket import corruptions, domain
    from experiments.pocket_studies.entropy import noise_entropy_table
    from policy.generation import generate_videos
    from pocket.preset import WEIGHTS_DIR, load_pocket_policy, read_pocket_record

    start = time.perf_counter()
    weights = Path(args.weights or WEIGHTS_DIR)
    policy = load_pocket_policy(weights)
    record = read_pocket_record(weights)
    digest = hashlib.sha256((weights / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16]

    heldout = [p for p in domain.heldout_prompts() for _ in range(args.per_prompt)]
    seeds = list(range(len(heldout)))
    rng = np.random.default_rng(0)
    train_all = domain.train_prompts()
    train = [train_all[i] for i in rng.choice(len(train_all), size=len(heldout), replace=False)]

    real = list(domain.generate_batch(heldout, seeds))
    rows = {
        "real domain videos, held-out prompts": score_set(real, heldout),
        "real, through the codec (the generator's ceiling)": score_set(list(policy.codec.decode(policy.codec.encode(np.stack(real)))), heldout),
        "pocket generator, held-out prompts": score_set(list(policy.decode(generate_videos(policy, heldout, seeds))), heldout),
        "pocket generator, training prompts": score_set(list(policy.decode(generate_videos(policy, train, seeds))), train),
        "real, blurred (sigma 0.7 px)": score_set([corruptions.blurred(v, 0.7) for v in real], heldout),
        "real, noisy (std 6/255)": score_set([corruptions.noisy(v, 6.0, seed=i) for i, v in enumerate(real)], heldout),
    }
    entropy_md = None
    if args.entropy_seeds > 0:
        entropy_md = noise_entropy_table(policy, domain.heldout_prompts()[::5], list(range(args.entropy_seeds))).markdown()

    training = record.get("training", {})
    header = "\n".join([
        "# Pocket world baseline",
        "",
        "Written by `python -m experiments.pocket_studies.baseline` (do not edit by hand).",
        "",
        f"- weights: `{weights.name}/diffusion_pytorch_model.safetensors` sha256 `{digest}`",
        f"- held-out prompts: {len(domain.heldout_prompts())} x {args.per_prompt} videos; noise seeds 0..{len(seeds) - 1} "
        "(generator) and domain seeds 0.. (real)",
        *_training_lines(training),
        "- heads in [0, 1], higher is better (definitions in docs/pocket.md); FVD-p: Frechet distance to real videos "
        "of the same prompts (reference seeds fixed), lower is better",
    ])
    text = render_report(rows, header, entropy_md)
    text += f"\nEvaluation took {time.perf_counter() - start:.0f} s.\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
