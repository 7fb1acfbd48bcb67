"""What scoring over HTTP costs against scoring in-process, measured side by side in one run.

    python -m benchmarks.http_reward_bench [--videos 48] [--batch-size 8] [--concurrency 2] [--reps 3]

The pocket reward (the pocket world's verifiers) scores pocket-domain renders of the train prompts:

1. direct:      `score` called in this process, batch by batch (the baseline)
2. http frames: the same model served by `python -m reward_service.serve` (its own process, on
                127.0.0.1), scored through `reward.model: http` with raw frames
3. http mp4:    the same, videos sent as H.264 MP4 (encoded here, decoded by the server)

Rounds alternate between the three so load from other jobs falls on all of them; each figure is the
median over `reps` rounds after a warm-up round. Printed: seconds, videos/s, request bytes per video
and the ratio to direct scoring. The scores of `http frames` are checked equal to direct ones.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

from reward_service.base import Video
from reward_service.http_schema import encode_video
from reward_service.registry import build_reward


def pocket_videos(n: int) -> tuple[list[Video], list[str]]:
    from pocket import domain

    prompts = [domain.train_prompts()[i % len(domain.train_prompts())] for i in range(n)]
    return [Video(domain.generate_video(p, i), domain.FPS) for i, p in enumerate(prompts)], prompts


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "reward_service.serve", "--model", "pocket", "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("serving reward"):
        proc.kill()
        raise RuntimeError(f"the reward server did not start (printed {line!r})")
    return proc, line.rsplit(" ", 1)[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    videos, prompts = pocket_videos(args.videos)
    direct = build_reward("pocket")
    proc, url = start_server()
    try:
        common = {"url": url, "batch_size": args.batch_size, "concurrency": args.concurrency}
        runs = {
            "direct": lambda: _batched(direct, videos, prompts, args.batch_size),
            "http frames": build_reward("http", **common, video_format="frames").score,
            "http mp4": build_reward("http", **common, video_format="mp4").score,
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        results = {}
        for rep in range(args.reps + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                results[name] = run(videos, prompts) if name != "direct" else run()
                if rep:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    for head in direct.heads:
        np.testing.assert_array_equal(results["http frames"][head], results["direct"][head])
    sizes = {
        "direct": 0,
        "http frames": np.mean([len(encode_video(v, "frames").data) for v in videos]),
        "http mp4": np.mean([len(encode_video(v, "mp4").data) for v in videos]),
    }
    base = statistics.median(times["direct"])
    print(f"{args.videos} pocket videos {videos[0].frames.shape}, batch {args.batch_size}, concurrency {args.concurrency}, median of {args.reps}")
    print(f"{'':12} {'seconds':>8} {'videos/s':>9} {'bytes/video':>12} {'x direct':>9}")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"{name:12} {t:8.3f} {args.videos / t:9.1f} {sizes[name]:12.0f} {t / base:9.2f}")
    print("http frames scores equal direct scores: yes")


def _batched(model, videos, prompts, size):
    out = {h: [] for h in model.heads}
    for start in range(0, len(videos), size):
        scores = model.score(videos[start : start + size], prompts[start : start + size])
        for h in model.heads:
            out[h].extend(scores[h])
    return {h: np.array(v) for h, v in out.items()}


if __name__ == "__main__":
    main()
