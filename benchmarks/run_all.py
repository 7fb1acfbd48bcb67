"""Run every benchmark, one after the other, each in its own process: `python -m benchmarks.run_all [name ...]`."""

from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = ("policy_bench", "replay_bench", "poison_bench", "reward_bench", "http_reward_bench", "scaling_bench", "long_video_bench",
              "pipeline_bench")


def main(argv: list[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== benchmarks.{name} ===", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        print(f"=== benchmarks.{name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
