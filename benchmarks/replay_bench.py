"""Replay throughput, measured side by side in one run.

    python -m benchmarks.replay_bench [--reps 3] [--redis redis://127.0.0.1:6379/0]

1. Codec: encode + decode of a candidate group against a plain memory copy of the same bytes.
2. Redis: store push + pull + ack (codec included) against raw SET + GET of the same payload.
3. Local store: push + pull + ack against writing and reading the same bytes as a file.

Two groups: a pocket-size one, and a real Wan2.1-1.3B 480p bf16 group (G=12, T=4, f=3, pivot 3,
no final latents: 59,304,960 tensor bytes), the size a learner pulls in production.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import redis
import torch

import replay
from replay.codec import decode, encode
from replay.synthetic import POCKET, REAL_480P, synthetic_group


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(baseline: Callable[[], object], measured: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, calls interleaved rep by rep (after a warm-up) so that load
    from other processes hits the baseline and the measured code alike."""
    fns = {"baseline": baseline, **measured}
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def row(label: str, nbytes: int, seconds: float, baseline: float | None = None) -> str:
    ratio = "" if baseline is None else f"   ratio {baseline / seconds:6.3f}"
    return f"  {label:<38} {seconds * 1e3:10.2f} ms  {mb_per_s(nbytes, seconds):9.1f} MB/s{ratio}"


def bench_codec(group, reps: int) -> list[str]:
    payload = encode(group)
    n = len(payload)
    t = paired(
        lambda: bytearray(payload),
        {"encode": lambda: encode(group), "decode": lambda: decode(payload), "both": lambda: decode(encode(group))},
        reps,
    )
    return [
        row("memory copy (baseline)", n, t["baseline"]),
        row("encode", n, t["encode"], t["baseline"]),
        row("decode (writable buffer, zero-copy)", n, t["decode"], t["baseline"]),
        row("encode + decode", n, t["both"], t["baseline"]),
        f"  encode + decode vs 2 memory copies (one each way): ratio {2 * t['baseline'] / t['both']:.3f}",
    ]


def bench_redis(group, reps: int, url: str, chunk_bytes: int) -> list[str]:
    prefix = f"arcopo-bench:{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(url)
    store = replay.open_store(url, prefix=prefix, chunk_bytes=chunk_bytes, max_queue_len=4)
    payload = bytes(encode(group))
    n = len(payload)
    key = prefix + "raw"
    counter = iter(range(10**9))

    def raw() -> None:
        client.set(key, payload)
        assert len(client.get(key)) == n

    def push_pull() -> None:
        g = group.model_copy(update={"group_id": f"bench-{next(counter)}"})
        store.push(g)
        [d] = store.pull(1, "bench")
        store.ack(d)

    try:
        t = paired(raw, {"store": push_pull}, reps)
        raw_s, store_s = t["baseline"], t["store"]
    finally:
        for k in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(k)
        store.close()
    return [
        row("raw SET + GET (baseline)", n, raw_s),
        row("store push + pull + ack (with codec)", n, store_s, raw_s),
    ]


def bench_local(group, reps: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        store = replay.open_store(f"file://{tmp}/store", max_queue_len=4)
        payload = bytes(encode(group))
        n = len(payload)
        path = Path(tmp) / "raw.arrow"
        counter = iter(range(10**9))

        def raw() -> None:
            path.write_bytes(payload)
            assert len(path.read_bytes()) == n

        def push_pull() -> None:
            g = group.model_copy(update={"group_id": f"bench-{next(counter)}"})
            store.push(g)
            [d] = store.pull(1, "bench")
            store.ack(d)

        t = paired(raw, {"store": push_pull}, reps)
        raw_s, store_s = t["baseline"], t["store"]
    return [
        row("raw file write + read (baseline)", n, raw_s),
        row("store push + pull + ack (with codec)", n, store_s, raw_s),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of the large group (pocket: 50x)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--chunk-mb", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    groups = {
        "pocket group (float32)": (synthetic_group(**POCKET, pivot=1), 50 * args.reps),
        "real 480p group (bf16, pivot 3)": (synthetic_group(**REAL_480P, pivot=3, dtype=torch.bfloat16), args.reps),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} cores, load average {load:.1f}; ratio = baseline time / measured time (1 = as fast)\n")
    for name, (group, reps) in groups.items():
        size = len(encode(group))
        print(f"{name}: {size:,} payload bytes ({group.nbytes:,} tensor bytes), median of {reps} interleaved runs")
        print(" codec")
        print("\n".join(bench_codec(group, reps)))
        print(" redis")
        print("\n".join(bench_redis(group, reps, args.redis, args.chunk_mb << 20)))
        print(" local store")
        print("\n".join(bench_local(group, reps)))
        print()


if __name__ == "__main__":
    main()
