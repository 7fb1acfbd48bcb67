"""Queue and buffer semantics, the same tests on the real Redis and on the local-file store."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import redis
import torch

import replay
from replay import record as record_module
from replay.codec import encode
from replay.local_store import LocalStore
from replay.record import CandidateGroup
from replay_testing import assert_same_group, group


def ids(deliveries) -> list[str]:
    return [d.group_id for d in deliveries]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_push_pull_round_trip_every_field(make_store, dtype):
    store = make_store()
    sent = [group(0, dtype=dtype, pivot=0), group(1, dtype=dtype, pivot=3, with_final=True)]
    for g in sent:
        assert store.push(g) is not None
    got = store.pull(5, "learner-0")
    assert ids(got) == ["group-0", "group-1"]  # FIFO
    for d, g in zip(got, sent):
        assert_same_group(d.group, g)
        assert not d.redelivered and not d.stale
    assert store.stats().pending == 2
    assert [store.ack(d) for d in got] == [True, True]
    s = store.stats()
    assert (s.queue_length, s.pending, s.pushed, s.acked) == (0, 0, 2, 2)
    assert store.pull(5, "learner-0") == []


def test_dead_consumer_group_is_redelivered_and_applied_once(make_store):
    store = make_store(claim_idle_s=0.3)
    for i in range(2):
        store.push(group(i))
    [dead] = store.pull(1, "consumer-a")  # consumer-a dies before acking
    [other] = store.pull(5, "consumer-b")
    assert other.group_id == "group-1"  # group-0 is not redelivered before the idle timeout
    assert store.ack(other)
    time.sleep(0.35)
    [again] = store.pull(5, "consumer-b")
    assert again.group_id == "group-0" and again.redelivered and again.consumer == "consumer-b"
    assert_same_group(again.group, group(0))
    assert store.ack(again) is True
    assert store.ack(dead) is False  # the late ack of the dead consumer does not apply it twice
    assert store.is_applied("group-0")
    s = store.stats()
    assert (s.acked, s.queue_length, s.pending) == (2, 0, 0)


def test_a_duplicate_of_an_applied_group_id_is_skipped(make_store):
    store = make_store()
    store.push(group(0))
    store.push(group(0))  # the same group pushed twice (a retried producer call)
    store.push(group(1))
    [first] = store.pull(1, "learner")
    assert store.ack(first)
    assert ids(store.pull(5, "learner")) == ["group-1"]  # the second copy of group-0 is skipped
    assert store.push(group(0)) is None  # pushing an applied group id is refused
    s = store.stats()
    assert (s.duplicates_skipped, s.refused_applied, s.queue_length - s.pending) == (1, 1, 0)


def test_two_copies_in_one_batch_are_delivered_once(make_store):
    store = make_store()
    store.push(group(0))
    store.push(group(0))
    assert ids(store.pull(5, "learner")) == ["group-0"]
    assert store.stats().duplicates_skipped == 1


def test_full_queue_gives_replay_full_error_and_drops_nothing(make_store):
    store = make_store(max_queue_len=2, push_timeout_s=0.2)
    store.push(group(0))
    store.push(group(1))
    started = time.monotonic()
    with pytest.raises(replay.ReplayFullError, match="max_queue_len=2.*group-2 was not stored"):
        store.push(group(2))
    assert time.monotonic() - started >= 0.2
    s = store.stats()
    assert (s.queue_length, s.pushed, s.full_timeouts) == (2, 2, 1)
    assert ids(store.pull(5, "learner")) == ["group-0", "group-1"]


def test_full_queue_blocks_the_producer_until_the_consumer_acks(make_store):
    store = make_store(max_queue_len=2)
    store.push(group(0))
    store.push(group(1))
    pushed = []
    producer = threading.Thread(target=lambda: pushed.append(store.push(group(2), timeout_s=20)))
    producer.start()
    time.sleep(0.3)
    assert producer.is_alive() and not pushed  # blocked: the queue is full
    [d] = store.pull(1, "learner")
    store.ack(d)
    producer.join(10)
    assert pushed and pushed[0] is not None
    got = store.pull(5, "learner")
    assert ids(got) == ["group-1", "group-2"]
    assert_same_group(got[1].group, group(2))


def test_corrupt_records_are_rejected_counted_and_skipped(make_store, monkeypatch):
    store = make_store()
    good, g1 = encode(group(0)), group(1)
    monkeypatch.setattr(record_module, "SCHEMA_VERSION", 7)
    future_version = encode(g1)
    monkeypatch.undo()
    base = group(2)
    wrong_shape = encode(CandidateGroup.model_construct(**{**dict(base), "pivot_x0": base.pivot_x0[:1]}))
    store.push(group(10))
    store.push_encoded(b"\x00garbage" * 50, "garbage", 0)
    store.push_encoded(good[: len(good) // 2], "group-0", 0)  # truncated
    store.push_encoded(future_version, "group-1", 0)
    store.push_encoded(wrong_shape, "group-2", 0)
    store.push_encoded(good, "not-group-0", 0)  # the entry's group id disagrees with the payload
    store.push(group(11))
    got = store.pull(20, "learner")
    assert ids(got) == ["group-10", "group-11"]
    assert_same_group(got[1].group, group(11))
    s = store.stats()
    assert (s.corrupt, s.dead_letters, s.queue_length) == (5, 5, 2)
    reasons = {letter["gid"]: letter["reason"] for letter in store.dead_letters()}
    assert "truncated" in reasons["group-0"] or "format" in reasons["group-0"]
    assert "schema version" in reasons["group-1"] and "pivot_x0" in reasons["group-2"]
    assert "payload says group-0" in reasons["not-group-0"]
    for d in got:
        store.ack(d)
    assert store.pull(20, "learner", block_ms=50) == []  # corrupt entries never come back


def test_stale_groups_are_dropped_or_kept_by_option(make_store):
    store = make_store()
    for version in (0, 1, 2, 3):
        store.push(group(version, policy_version=version))
    oldest = replay.min_policy_version(current_version=3, max_lag=1)
    got = store.pull(1, "learner", min_policy_version=oldest)
    assert ids(got) == ["group-2"]
    assert store.stats().stale_dropped == 2
    store.push(group(9, policy_version=0))
    kept = store.pull(5, "learner", min_policy_version=oldest, keep_stale=True)
    assert [(d.group_id, d.stale) for d in kept] == [("group-3", False), ("group-9", True)]
    assert store.stats().stale_kept == 1


def test_blocking_pull_waits_for_a_push(make_store):
    store = make_store()
    threading.Timer(0.2, lambda: store.push(group(0))).start()
    started = time.monotonic()
    got = store.pull(1, "learner", block_ms=5000)
    assert ids(got) == ["group-0"] and time.monotonic() - started < 4
    assert store.pull(1, "learner", block_ms=100) == []


def test_drain_discards_queued_and_pending_groups(make_store):
    store = make_store()
    for i in range(3):
        store.push(group(i))
    store.pull(1, "learner")
    assert store.drain() == 3
    s = store.stats()
    assert (s.queue_length, s.pending, s.drained) == (0, 0, 3)
    assert store.pull(5, "learner") == []


def test_buffer_samples_uniformly_with_replacement(make_store):
    store = make_store()
    for i in range(4):
        assert store.buffer_add(group(i))
    assert not store.buffer_add(group(0))  # already in the table
    assert store.buffer_size() == 4
    sample = store.buffer_sample(1000, np.random.default_rng(0))
    names = [g.group_id for g in sample]
    frequencies = np.array([names.count(f"group-{i}") for i in range(4)]) / len(names)
    assert len(names) == 1000 and np.all(np.abs(frequencies - 0.25) < 0.06)
    assert_same_group(next(g for g in sample if g.group_id == "group-3"), group(3))
    assert [g.group_id for g in store.buffer_sample(8, 5)] == [g.group_id for g in store.buffer_sample(8, 5)]
    assert store.buffer_size() == 4  # sampling does not consume without max_times_sampled


def test_max_times_sampled_removes_an_entry_after_that_many_draws(make_store):
    store = make_store(max_times_sampled=2)
    for i in range(3):
        store.buffer_add(group(i))
    first = store.buffer_sample(4, np.random.default_rng(1))
    rest = store.buffer_sample(10, np.random.default_rng(2))
    names = [g.group_id for g in first + rest]
    assert len(names) == 6 and all(names.count(f"group-{i}") == 2 for i in range(3))
    assert store.buffer_size() == 0 and store.buffer_sample(3, 0) == []
    assert store.stats().buffer_removed == 3


def test_buffer_max_size_refuses_instead_of_evicting(make_store):
    store = make_store(buffer_max_size=2)
    store.buffer_add(group(0))
    store.buffer_add(group(1))
    with pytest.raises(replay.ReplayFullError, match="buffer_max_size=2"):
        store.buffer_add(group(2))
    assert {g.group_id for g in store.buffer_sample(50, 0)} == {"group-0", "group-1"}


def test_export_import_round_trip(make_store, tmp_path):
    source = make_store("source")
    sent = [group(i, dtype=torch.bfloat16) for i in range(3)]
    for g in sent:
        source.buffer_add(g)
    assert source.export_buffer(tmp_path / "reference") == 3
    assert len(list((tmp_path / "reference").glob("*.arrow"))) == 3
    for target in (make_store("target"), replay.open_store(f"file://{tmp_path / 'local-target'}")):
        assert target.import_buffer(tmp_path / "reference") == 3
        assert target.import_buffer(tmp_path / "reference") == 0  # same group ids: nothing new
        by_id = {g.group_id: g for g in target.buffer_sample(60, 0)}
        assert sorted(by_id) == ["group-0", "group-1", "group-2"]
        for g in sent:
            assert_same_group(by_id[g.group_id], g)


def test_import_with_a_corrupt_file_names_it_and_adds_nothing(make_store, tmp_path):
    store = make_store()
    store.buffer_add(group(0))
    store.buffer_add(group(1))
    store.export_buffer(tmp_path / "ref")
    victim = sorted((tmp_path / "ref").glob("*.arrow"))[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    target = make_store("target")
    with pytest.raises(replay.CorruptRecordError, match=victim.name):
        target.import_buffer(tmp_path / "ref")
    assert target.buffer_size() == 0


def damage_buffer_entry(store, group_id: str) -> None:
    """Flip one byte in the middle of a buffer entry's stored payload."""
    if isinstance(store, LocalStore):
        table = json.loads((store.root / "state.json").read_text())["buffer"]
        path = store.root / "buffer" / table[group_id]["file"]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x04
        path.write_bytes(data)
    else:
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        _, token, _, _ = client.hget(store.options.prefix + "buffer", group_id).decode().split(" ")
        key = f"{store.options.prefix}blob:{token}:0"
        data = bytearray(client.get(key))
        data[len(data) // 2] ^= 0x04
        client.set(key, bytes(data))


def test_corrupt_buffer_entry_is_removed_counted_and_left_out(make_store):
    store = make_store()
    for i in range(3):
        store.buffer_add(group(i))
    damage_buffer_entry(store, "group-1")
    names = {g.group_id for g in store.buffer_sample(60, 0)}
    assert names == {"group-0", "group-2"}
    assert store.buffer_size() == 2 and store.stats().corrupt == 1
    assert {g.group_id for g in store.buffer_sample(60, 1)} == {"group-0", "group-2"}
