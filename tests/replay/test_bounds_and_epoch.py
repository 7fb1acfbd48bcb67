"""Poison past the bytes: records bounded before they are read, groups quarantined, and a store that
lost its data refused instead of recreated (both backends where the behaviour is shared)."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest
import redis
import torch

import replay
from replay.codec import CorruptRecordError, decode, encode
from replay_testing import FAST, assert_same_group, group

SHARED = "redis://127.0.0.1:6379/0"


def _zero_group(seed: int = 0):
    """A valid group whose latents are zeros: 4 MiB a tensor that zstd packs into a few KB."""
    g = group(seed, channels=16, height=32, width=64, frames_per_chunk=2, num_steps=4, group_size=4)
    zeros = torch.zeros_like(g.pivot_x0)
    return g.model_copy(update={"pivot_x0": zeros, "pivot_inputs": zeros.clone(), "prefix_latents": torch.zeros_like(g.prefix_latents)})


def _recompressed(payload: bytearray, codec: str) -> bytes:
    """The same schema and values (so the same checksum), written with a compressed body."""
    reader = pa.ipc.open_file(pa.py_buffer(payload))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, reader.schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
        writer.write_batch(reader.get_batch(0))
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_compressed_record_is_refused_before_it_is_inflated(codec):
    sent = _zero_group()
    payload = encode(sent)
    packed = _recompressed(payload, codec)
    assert len(packed) * 50 < len(payload)  # what would have been inflated: 50x the bytes received
    with pytest.raises(CorruptRecordError, match="compressed") as err:
        decode(bytearray(packed))
    assert err.value.reason == "bounds"
    assert_same_group(decode(payload), sent)  # the uncompressed record is unaffected


def _claiming(payload: bytearray, name: str, shape: list[int]) -> bytearray:
    """The record with tensor `name`'s shape tag replaced by `shape` (its bytes unchanged)."""
    reader = pa.ipc.open_file(pa.py_buffer(payload))
    schema = reader.schema
    index = schema.get_field_index(name)
    field = schema.field(index)
    schema = schema.set(index, field.with_metadata({**field.metadata, b"shape": json.dumps(shape).encode()}))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch(reader.get_batch(0).columns, schema=schema))
    return bytearray(sink.getvalue().to_pybytes())


def test_declared_tensor_sizes_above_the_ceiling_are_refused_before_the_tensors_are_read():
    payload = encode(group(0))  # about 70 KB
    claims = _claiming(payload, "pivot_x0", [2**20, 2**20])  # 4 TiB of float32
    with pytest.raises(CorruptRecordError, match=r"declare \d+ bytes, above the ceiling of 1048576 bytes") as err:
        decode(claims, max_bytes=1 << 20)
    assert err.value.reason == "bounds"
    assert len(claims) < 100_000
    with pytest.raises(CorruptRecordError, match="above the ceiling of 4096 bytes"):
        decode(payload, max_bytes=4096)  # the genuine record under a ceiling below its own size
    assert_same_group(decode(payload, max_bytes=1 << 20), group(0))


def test_a_redis_entry_claiming_a_million_chunks_is_dead_lettered_without_fetching(redis_prefix):
    store = replay.open_store(f"{SHARED}?prefix={redis_prefix}", **FAST)
    store.push(group(0))
    client = redis.Redis.from_url(SHARED)
    for gid, chunks, nbytes in (("many-chunks", 10**6, 50_000), ("huge", 10**6, 10**6 * (64 << 20))):
        client.xadd(redis_prefix + "queue", {"gid": gid, "pv": 0, "token": "t", "chunks": chunks, "nbytes": nbytes})
    store.push(group(1))
    got = store.pull(5, "learner")
    assert [d.group_id for d in got] == ["group-0", "group-1"]  # the neighbours are delivered
    letters = {letter["gid"]: letter["reason"] for letter in store.dead_letters()}
    assert "(bounds)" in letters["many-chunks"] and "claims 1000000 chunks for 50000 bytes (at most 1" in letters["many-chunks"]
    assert "(bounds)" in letters["huge"] and "the ceiling is" in letters["huge"]
    assert store.stats().corrupt == 2 and store.stats().queue_length == 2


def test_a_payload_file_above_the_ceiling_is_dead_lettered_unread(tmp_path):
    store = replay.open_store(f"file://{tmp_path / 'store'}", max_record_bytes=128 << 10, **FAST)
    store.push(group(0))  # about 70 KB
    store.push(group(1, with_final=True, channels=16, height=32, width=64))  # several MB
    store.push(group(2))
    assert [d.group_id for d in store.pull(5, "learner")] == ["group-0", "group-2"]
    [letter] = store.dead_letters()
    assert letter["gid"] == "group-1" and "(bounds)" in letter["reason"] and "the ceiling is" in letter["reason"]


def test_a_quarantined_group_is_dead_lettered_with_its_reason_and_never_delivered_again(make_store):
    store = make_store()
    for i in range(3):
        store.push(group(i))
    got = {d.group_id: d for d in store.pull(3, "learner")}
    store.quarantine(got["group-1"], "nonfinite: pivot_x0 holds NaN")
    for gid in ("group-0", "group-2"):
        store.ack(got[gid])
    assert store.pull(3, "learner", block_ms=int(FAST["claim_idle_s"] * 2000)) == []  # not reclaimed
    assert not store.is_applied("group-1")
    [letter] = store.dead_letters()
    assert letter["gid"] == "group-1" and letter["reason"] == "nonfinite: pivot_x0 holds NaN"
    stats = store.stats()
    assert (stats.quarantined, stats.acked, stats.queue_length, stats.corrupt) == (1, 2, 0, 0)
    store.buffer_add(group(5))
    store.buffer_add(group(6))
    store.buffer_quarantine("group-5", "geometry: latent shape")
    assert [g.group_id for g in store.buffer_sample(4, 0)] == ["group-6"] * 4
    assert store.stats().quarantined == 2 and store.dead_letters()[0]["reason"] == "geometry: latent shape"


def test_the_run_epoch_is_kept_across_processes_and_a_replaced_store_is_refused(make_store, tmp_path):
    store = make_store()
    store.push(group(0))
    epoch = store.epoch
    assert len(epoch.split("@")[0]) == 32
    again = make_store(epoch=epoch)  # another process of the run, told the epoch
    assert again.epoch == epoch and [d.group_id for d in again.pull(1, "learner")] == ["group-0"]
    # The data goes (every key of the prefix deleted / the store directory replaced by an empty one).
    if make_store.backend == "redis":
        client = redis.Redis.from_url(SHARED)
        prefix = store.options.prefix
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
    else:
        shutil.rmtree(store.root)
        store.root.mkdir()
        for sub in ("entries", "buffer", "dead"):
            (store.root / sub).mkdir()
    with pytest.raises(replay.StoreLostError, match=f"this run's store has epoch {epoch}"):
        store.push(group(1))
    with pytest.raises(replay.StoreLostError, match=f"this run's store has epoch {epoch}"):
        store.buffer_add(group(2))
    if make_store.backend == "redis":  # not even the payload's blob keys were written to the emptied store
        assert list(client.scan_iter(match=prefix + "*")) == []
    with pytest.raises(replay.StoreLostError):
        make_store(epoch=epoch)


def test_mark_applied_rebuilds_an_applied_set_and_refuses_those_groups_again(make_store):
    store = make_store()
    assert store.mark_applied(["group-0", "group-1", "group-0"]) == 2
    assert store.mark_applied(["group-1", "group-2"]) == 1
    assert store.push(group(1)) is None and store.push(group(3)) is not None  # group-1 counts as applied
    assert [d.group_id for d in store.pull(5, "learner")] == ["group-3"]
    assert all(store.is_applied(f"group-{i}") for i in range(3)) and not store.is_applied("group-3")


def test_a_producer_writes_no_payload_into_a_store_that_lost_its_epoch(redis_prefix):
    """A producer killed between writing a payload and admitting it must not have written into an emptied
    store: the blob keys are written only while the run's epoch is there (checked in the same transaction)."""
    store = replay.open_store(f"{SHARED}?prefix={redis_prefix}", **FAST)
    try:
        store.push(group(0))
        client = redis.Redis.from_url(SHARED)
        client.delete(redis_prefix + "epoch")
        for key in client.scan_iter(match=redis_prefix + "*"):
            client.delete(key)

        def killed_before_admission(*args, **kwargs):
            raise SystemExit("the producer died after writing its payload")

        store._admit = killed_before_admission
        with pytest.raises(replay.StoreLostError, match="has no run epoch"):
            store.push(group(1))
        assert list(client.scan_iter(match=redis_prefix + "*")) == []
    finally:
        store.close()
