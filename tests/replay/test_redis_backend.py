"""Redis-only behaviour: chunked payloads, damage at rest, URLs and credentials, and Redis going away."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

import replay
from replay.codec import encode
from replay_testing import FAST, ThrowawayRedis, assert_same_group, group

SHARED = "redis://127.0.0.1:6379/0"


def blob_keys(prefix: str) -> list[bytes]:
    return sorted(redis.Redis.from_url(SHARED).scan_iter(match=prefix + "blob:*"))


def test_large_payloads_are_split_over_several_keys(redis_prefix):
    store = replay.open_store(f"{SHARED}?prefix={redis_prefix}&chunk_bytes=4096", **FAST)
    sent = group(0, with_final=True)  # about 60 KB in float32
    store.push(sent)
    store.buffer_add(group(1, with_final=True))
    assert len(blob_keys(redis_prefix)) > 2 * 10
    [d] = store.pull(1, "learner")
    assert_same_group(d.group, sent)
    assert_same_group(store.buffer_sample(1, 0)[0], group(1, with_final=True))
    store.ack(d)  # the acked group's chunks are deleted; the buffer entry's stay
    assert len(blob_keys(redis_prefix)) == -(-len(encode(group(1, with_final=True))) // 4096)


def test_damage_at_rest_in_one_chunk_is_caught_and_dead_lettered(redis_prefix):
    store = replay.open_store(f"{SHARED}?prefix={redis_prefix}&chunk_bytes=4096", **FAST)
    store.push(group(0))
    keys = blob_keys(redis_prefix)
    client = redis.Redis.from_url(SHARED)
    middle = keys[len(keys) // 2]
    chunk = bytearray(client.get(middle))
    chunk[100] ^= 0xFF
    client.set(middle, bytes(chunk))
    store.push(group(1))
    group1_keys = sorted(set(blob_keys(redis_prefix)) - set(keys))
    client.delete(group1_keys[-1])  # a chunk of group-1 lost at rest
    store.push(group(2))
    assert [d.group_id for d in store.pull(5, "learner")] == ["group-2"]
    letters = {letter["gid"]: letter["reason"] for letter in store.dead_letters()}
    assert "checksum" in letters["group-0"] and "missing" in letters["group-1"]
    assert store.stats().corrupt == 2


def test_url_options_and_unknown_options():
    with pytest.raises(ValueError, match="unknown replay store option.*max_len"):
        replay.open_store(f"{SHARED}?max_len=3")
    with pytest.raises(ValueError, match="scheme 'http'"):
        replay.open_store("http://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="database number"):
        replay.open_store("redis://127.0.0.1:6379/zero")


def test_url_parts_become_connection_settings(monkeypatch):
    monkeypatch.setenv(replay.PASSWORD_ENV, "from-env")
    connection, options = replay.redis_connection(
        "rediss://alice@cache.internal:6380/3?prefix=run7:&ssl_ca_certs=/etc/ca.pem&max_queue_len=8"
    )
    assert connection == {
        "host": "cache.internal", "port": 6380, "db": 3, "username": "alice", "password": "from-env",
        "ssl": True, "ssl_ca_certs": "/etc/ca.pem",
    }
    assert options == {"prefix": "run7:", "max_queue_len": "8"}
    connection, _ = replay.redis_connection("redis://:p%40ss@h/0")
    assert connection["password"] == "p@ss" and "ssl" not in connection  # the URL's password wins


def test_password_comes_from_the_environment_never_the_code(tmp_path, monkeypatch):
    server = ThrowawayRedis(tmp_path, password="s3cret-from-env")
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        monkeypatch.delenv(replay.PASSWORD_ENV, raising=False)
        with pytest.raises(replay.ReplayError, match="refused the credentials.*ARCOPO_REDIS_PASSWORD"):
            replay.open_store(url, **FAST)
        monkeypatch.setenv(replay.PASSWORD_ENV, "s3cret-from-env")
        store = replay.open_store(url, **FAST)
        store.push(group(0))
        assert [d.group_id for d in store.pull(1, "learner")] == ["group-0"]
        assert "s3cret" not in repr(store)
        monkeypatch.delenv(replay.PASSWORD_ENV)
        in_url = replay.open_store(f"redis://:s3cret-from-env@127.0.0.1:{server.port}/0", **FAST)
        assert in_url.stats().queue_length == 1
    finally:
        server.kill()


OUTAGE = dict(FAST, retry_attempts=3, retry_backoff_s=0.05, socket_timeout_s=0.5)


def test_redis_killed_mid_run_gives_a_clear_retried_error_then_stops_on_the_lost_data(throwaway_redis):
    url = f"redis://127.0.0.1:{throwaway_redis.port}/0"
    store = replay.open_store(url, **OUTAGE)
    store.push(group(0))
    [d] = store.pull(1, "learner")
    store.ack(d)
    store.push(group(2))  # queued when Redis goes
    throwaway_redis.kill()
    held = group(1)
    started = time.monotonic()
    with pytest.raises(replay.ReplayUnavailableError, match=r"unavailable: push of group group-1 .*failed 3 times"):
        store.push(held)
    with pytest.raises(replay.ReplayUnavailableError, match="pull failed 3 times"):
        store.pull(1, "learner", block_ms=100)
    assert time.monotonic() - started < 5  # bounded retries, no hang
    throwaway_redis.start()  # an empty Redis (no persistence): group-2 and the applied set are gone
    # Nothing is recreated: push, pull and ack each stop with the store's loss, and nothing is written.
    with pytest.raises(replay.StoreLostError, match=r"has no run epoch.*push of group group-1.*applied set are gone.*--resume"):
        store.push(held)
    with pytest.raises(replay.StoreLostError, match="queue stream is gone"):
        store.pull(1, "learner")
    with pytest.raises(replay.StoreLostError, match="ack of group group-0"):
        store.ack(d)
    # A process that joins later with the run's epoch is refused too; one without an epoch starts a new store.
    with pytest.raises(replay.StoreLostError, match=store.epoch):
        replay.open_store(url, epoch=store.epoch, **OUTAGE)
    assert redis.Redis(port=throwaway_redis.port).dbsize() == 0  # nothing was written to the empty Redis
    fresh = replay.open_store(url, **OUTAGE)
    assert fresh.epoch != store.epoch and fresh.push(held) is not None


def test_redis_frozen_mid_run_times_out_instead_of_hanging(throwaway_redis):
    store = replay.open_store(f"redis://127.0.0.1:{throwaway_redis.port}/0", **OUTAGE)
    store.push(group(0))
    os.kill(throwaway_redis.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(replay.ReplayUnavailableError, match="TimeoutError"):
            store.pull(1, "learner", block_ms=5000)
        with pytest.raises(replay.ReplayUnavailableError, match="push of group group-1"):
            store.push(group(1))
        assert time.monotonic() - started < 8
    finally:
        os.kill(throwaway_redis.process.pid, signal.SIGCONT)
    got = store.pull(5, "learner", block_ms=500)
    assert [d.group_id for d in got] == ["group-0"]  # nothing stored before the freeze was lost
    assert_same_group(got[0].group, group(0))
