"""What hostile records cost the data path: each is refused before it costs what it claims.

    python -m benchmarks.poison_bench [--bomb-mb 64] [--reps 3] [--redis redis://127.0.0.1:6379/0]

1. Decompression bomb: a record whose body is zstd-compressed zeros, its tensors declaring
   `--bomb-mb` MiB. Measured: `decode` refusing it (from the batch's metadata), against pyarrow
   reading the same file (`get_batch`), which inflates the body: what a reader without the check
   pays before it can look at anything. Arrow memory held afterwards is shown for both.
2. A Redis stream entry claiming 10^6 chunks between two good groups: the pull that dead-letters it
   and delivers its neighbours, against a pull of two good groups alone.
3. The learner's door (`learner.group_validation.check_group`, prompt check left out) on a real
   Wan2.1-1.3B 480p bf16 group, against decoding the same group (what every pull pays anyway).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import pyarrow as pa
import redis
import torch

import replay
from learner.group_validation import PolicyGeometry, check_group
from learner.settings import LearnerSettings
from replay.codec import decode, encode
from replay.synthetic import POCKET, REAL_480P, synthetic_group


def median_s(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bomb(megabytes: int) -> bytes:
    """A valid record (checksum included) of zero latents, rewritten with a zstd-compressed body."""
    frames = max(1, (megabytes << 20) // (2 * 4 * 4 * 16 * 64 * 128 * 4))  # two tensors [4, 4, f, 16, 64, 128] float32
    group = synthetic_group(channels=16, height=64, width=128, frames_per_chunk=frames, num_steps=4, group_size=4, pivot=0)
    zeros = torch.zeros_like(group.pivot_x0)
    payload = encode(group.model_copy(update={"pivot_x0": zeros, "pivot_inputs": zeros}))
    reader = pa.ipc.open_file(pa.py_buffer(payload))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, reader.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_batch(reader.get_batch(0))
    return sink.getvalue().to_pybytes()


def bench_bomb(megabytes: int, reps: int) -> list[str]:
    packed = bomb(megabytes)

    def refused() -> None:
        try:
            decode(bytearray(packed))
        except replay.CorruptRecordError as err:
            assert err.reason == "bounds", err
        else:
            raise AssertionError("the compressed record was accepted")

    def inflated() -> pa.RecordBatch:
        return pa.ipc.open_file(pa.py_buffer(packed)).get_batch(0)

    held = pa.total_allocated_bytes()
    batch = inflated()
    inflated_bytes = pa.total_allocated_bytes() - held
    del batch
    t_refuse, t_inflate = median_s(refused, reps), median_s(inflated, reps)
    return [
        f"  record of {len(packed):,} bytes declaring {megabytes} MiB of tensors",
        f"  pyarrow get_batch (inflates, baseline)  {t_inflate * 1e3:9.2f} ms, {inflated_bytes / 2**20:7.1f} MiB held",
        f"  decode, refused (bounds)                {t_refuse * 1e3:9.2f} ms, {0:7.1f} MiB held",
    ]


def bench_chunk_claim(url: str, reps: int) -> list[str]:
    prefix = f"arcopo-bench:{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(url)
    store = replay.open_store(url, prefix=prefix)
    counter = iter(range(10**9))

    def pull(with_claim: bool) -> None:
        store.push(synthetic_group(**POCKET, group_id=f"good-{next(counter)}"))
        if with_claim:
            fields = {"gid": f"claim-{next(counter)}", "pv": 0, "token": "t", "chunks": 10**6, "nbytes": 10**6 * 1024}
            client.xadd(prefix + "queue", fields)
        store.push(synthetic_group(**POCKET, group_id=f"good-{next(counter)}"))
        got = store.pull(3, "bench")
        assert len(got) == 2, [d.group_id for d in got]
        for d in got:
            store.ack(d)

    try:
        t_plain = median_s(lambda: pull(False), reps)
        t_claim = median_s(lambda: pull(True), reps)
        letters = store.stats().corrupt
    finally:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
        store.close()
    return [
        f"  pull of 2 good groups (baseline)                 {t_plain * 1e3:9.2f} ms",
        f"  the same with a 10^6-chunk claim between them    {t_claim * 1e3:9.2f} ms ({letters} claims dead-lettered)",
    ]


def bench_door(reps: int) -> list[str]:
    group = synthetic_group(**REAL_480P, pivot=3, dtype=torch.bfloat16)
    group = group.model_copy(update={"reward_valid": torch.ones(REAL_480P["group_size"], dtype=torch.bool)})
    payload = encode(group)
    geometry = PolicyGeometry((REAL_480P["channels"], REAL_480P["height"], REAL_480P["width"]), REAL_480P["frames_per_chunk"],
                              REAL_480P["num_chunks"], REAL_480P["num_steps"], 1000, REAL_480P["group_size"], "copo")
    config = LearnerSettings.model_validate({"algorithm": {"group_size": REAL_480P["group_size"]}})
    t_decode = median_s(lambda: decode(payload), reps)
    t_door = median_s(lambda: check_group(group, geometry, config, 0, lambda prompt: None), reps)
    return [
        f"  decode of the group (baseline)  {t_decode * 1e3:9.2f} ms ({len(payload):,} bytes)",
        f"  check_group at the door         {t_door * 1e3:9.2f} ms (ratio {t_door / t_decode:.2f} of a decode)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bomb-mb", type=int, default=64, help="tensor MiB the compressed record declares")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} cores, load average {load:.1f}; medians of {args.reps} runs after a warm-up\n")
    print("1. compressed record (decompression bomb)")
    print("\n".join(bench_bomb(args.bomb_mb, args.reps)))
    print("2. Redis stream entry claiming 10^6 chunks")
    print("\n".join(bench_chunk_claim(args.redis, args.reps)))
    print("3. the learner's door, real 480p bf16 group")
    print("\n".join(bench_door(args.reps)))


if __name__ == "__main__":
    main()
