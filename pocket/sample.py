"""Write sample videos (MP4 or GIF) and a contact-sheet PNG for a list of prompts.

    python -m pocket.sample --out samples/                       # a few held-out prompts
    python -m pocket.sample --prompts "two red circles moving left on a dark background" --out samples/
    python -m pocket.sample --real --out samples/real            # the domain's own videos, for comparison

Videos are upscaled (nearest neighbour, ``--zoom``) so 32x32 frames are viewable. The contact sheet
has one row per video (frames evenly spaced about ``--every`` apart, first and last included) with the prompt and the verifier scores above it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall shared CPUs

import argparse
import re
from pathlib import Path

from policy.video_io import contact_sheet, write_video


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit]


def default_prompts() -> list[str]:
    from pocket import domain

    return domain.heldout_prompts()[::7]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", nargs="+", default=None, help="prompts (default: every 7th held-out prompt)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first video (then +1 per video)")
    parser.add_argument("--per-prompt", type=int, default=1, help="videos per prompt")
    parser.add_argument("--weights", default=None, help="pocket weights directory (default: the shipped weights)")
    parser.add_argument("--real", action="store_true", help="write the domain's real videos instead of generating")
    parser.add_argument("--format", choices=("mp4", "gif"), default="mp4")
    parser.add_argument("--zoom", type=int, default=4, help="upscale factor of the written videos")
    parser.add_argument("--every", type=int, default=2, help="about this many frames between the contact sheet's evenly spaced frames")
    args = parser.parse_args(argv)

    from pocket import domain, verifiers

    prompts = [p for p in (args.prompts or default_prompts()) for _ in range(args.per_prompt)]
    for p in dict.fromkeys(prompts):
        domain.parse_prompt(p)  # fail before any work on a prompt outside the grammar
    seeds = [args.seed + i for i in range(len(prompts))]
    if args.real:
        videos = list(domain.generate_batch(prompts, seeds))
        fps = domain.FPS
    else:
        from policy.generation import generate_videos
        from pocket.preset import WEIGHTS_DIR, load_pocket_policy

        policy = load_pocket_policy(args.weights or WEIGHTS_DIR)
        videos = list(policy.decode(generate_videos(policy, prompts, seeds)))
        fps = policy.fps

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = []
    for i, (video, prompt, seed) in enumerate(zip(videos, prompts, seeds)):
        path = write_video(video, fps, out / f"{i:02d}_{slug(prompt)}_seed{seed}.{args.format}", upscale=args.zoom)
        s = verifiers.score_video(video, prompt)
        labels.append(f"{prompt}\nseed {seed}  TA {s['TA']:.2f}  VQ {s['VQ']:.2f}  MQ {s['MQ']:.2f}")
        print(f"{path}  TA {s['TA']:.3f} VQ {s['VQ']:.3f} MQ {s['MQ']:.3f}")
    sheet = contact_sheet(videos, labels, out / "contact_sheet.png", frames_per_row=-(-len(videos[0]) // args.every), upscale=3)
    print(f"contact sheet: {sheet}")


if __name__ == "__main__":
    main()
