"""The Redis replay store: the queue is a Redis Stream with a consumer group, payloads live in blob keys.

Keys, all under the store's prefix:
    queue                   stream; one small entry per group: gid, pv, token, chunks, nbytes
    blob:<token>:<i>        the payload bytes, split into `chunk_bytes` pieces (Redis caps a value at 512 MB)
    admitted:<token>        marks a push as done, so a push retried after a lost reply is not added twice
    applied                 set of applied group ids (exactly-once application over at-least-once delivery)
    stats                   hash of counters
    dead                    stream of dead letters: entry id, group id, reason (the payload is dropped)
    buffer                  hash: group id -> "seq token chunks nbytes"
    buffer:sampled          hash: group id -> times sampled
    buffer:seq              insertion counter (sampling order is insertion order, so a seeded rng repeats)

Blob keys are written with an expiry and made persistent by the same Lua script that admits the
entry, so a producer that dies halfway leaves nothing behind for long. The admission script checks
the queue length, so the bound holds with any number of producers. An entry stays in the stream
until acked (ack = XACK + XDEL), so XLEN is the number of unacked groups.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, Callable, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from replay.codec import CorruptRecordError, decode
from replay.redis_scripts import ACK, ADMIT, BUFFER_ADD
from replay.store import (
    COUNTERS,
    Delivery,
    ReplayError,
    ReplayFullError,
    ReplayStats,
    ReplayStore,
    ReplayUnavailableError,
    StoreOptions,
    as_rng,
    draw_with_replacement,
)

T = TypeVar("T")

UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


class RedisStore(ReplayStore):
    def __init__(self, connection: dict[str, Any], options: StoreOptions | None = None):
        self.options = o = options or StoreOptions()
        self._where = f"{connection.get('host', 'localhost')}:{connection.get('port', 6379)}/{connection.get('db', 0)}"
        self._redis = redis.Redis(
            **connection,
            socket_timeout=o.socket_timeout_s,
            socket_connect_timeout=o.socket_timeout_s,
            retry=Retry(NoBackoff(), 0),  # this class retries whole operations itself
        )
        p = o.prefix
        self._queue, self._applied, self._stats_key, self._dead = p + "queue", p + "applied", p + "stats", p + "dead"
        self._buffer, self._sampled, self._seq = p + "buffer", p + "buffer:sampled", p + "buffer:seq"
        self._admit = self._redis.register_script(ADMIT)
        self._ack = self._redis.register_script(ACK)
        self._buffer_admit = self._redis.register_script(BUFFER_ADD)
        self._retry(self._ensure_group, "connect")

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self.options.prefix!r})"

    # ---- plumbing ----------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        try:
            self._redis.xgroup_create(self._queue, self.options.consumer_group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn`, retrying connection failures with exponential backoff, then ReplayUnavailableError."""
        o = self.options
        delay, start, last = o.retry_backoff_s, time.monotonic(), None
        for attempt in range(o.retry_attempts):
            try:
                return fn()
            except redis.AuthenticationError as err:  # a ConnectionError subclass, but retrying cannot help
                raise ReplayError(
                    f"Redis at {self._where} refused the credentials ({err}); give the password in the URL "
                    f"or in the ARCOPO_REDIS_PASSWORD environment variable"
                ) from None
            except UNAVAILABLE as err:
                last = err
            except redis.ResponseError as err:
                if "NOGROUP" not in str(err) and "no such key" not in str(err):
                    raise  # otherwise the stream vanished (a restarted Redis without persistence): recreate it
                last = err
                with contextlib.suppress(*UNAVAILABLE):
                    self._ensure_group()
                    continue
            if attempt + 1 < o.retry_attempts:
                time.sleep(delay)
                delay = min(2 * delay, o.retry_backoff_max_s)
        raise ReplayUnavailableError(
            f"Redis at {self._where} is unavailable: {what} failed {o.retry_attempts} times in "
            f"{time.monotonic() - start:.1f}s (last error: {type(last).__name__}: {last})"
        ) from last

    def _blob_keys(self, token: str, chunks: int) -> list[str]:
        return [f"{self.options.prefix}blob:{token}:{i}" for i in range(chunks)]

    def _write_blobs(self, payload: bytes | bytearray, ttl_s: int, what: str) -> tuple[str, list[str], int]:
        view = memoryview(payload).cast("B")
        size, step = len(view), self.options.chunk_bytes
        pieces = [view[i : i + step] for i in range(0, max(size, 1), step)]
        token = uuid.uuid4().hex
        keys = self._blob_keys(token, len(pieces))

        def write() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for key, piece in zip(keys, pieces):
                pipe.set(key, piece, ex=ttl_s)
            pipe.execute()

        self._retry(write, what)
        return token, keys, size

    def _delete_quietly(self, keys: list[str]) -> None:
        with contextlib.suppress(*UNAVAILABLE):
            if keys:
                self._redis.unlink(*keys)

    def _count(self, counter: str, amount: int = 1) -> None:
        self._retry(lambda: self._redis.hincrby(self._stats_key, counter, amount), "counting")

    # ---- queue -------------------------------------------------------------------------------
    def push_encoded(self, payload, group_id, policy_version, timeout_s=None):
        o = self.options
        timeout_s = o.push_timeout_s if timeout_s is None else timeout_s
        ttl = int(max(3600, 2 * timeout_s + 60))
        what = f"push of group {group_id} (not confirmed stored: keep the group and push it again)"
        token, keys, size = self._write_blobs(payload, ttl, what)
        marker = f"{o.prefix}admitted:{token}"
        deadline = time.monotonic() + timeout_s
        while True:
            args = [o.max_queue_len, group_id, int(policy_version), token, len(keys), size, ttl]
            script_keys = [self._queue, self._applied, self._stats_key, marker, *keys]
            result = self._retry(lambda: self._admit(keys=script_keys, args=args), what)
            if result == b"applied":
                self._delete_quietly(keys)
                return None
            if result == b"lost":  # blobs expired while waiting for room: write them again
                self._delete_quietly(keys)
                token, keys, size = self._write_blobs(payload, ttl, what)
                marker = f"{o.prefix}admitted:{token}"
                continue
            if result is not None:
                return result.decode()
            if time.monotonic() >= deadline:
                self._delete_quietly(keys)
                with contextlib.suppress(ReplayUnavailableError):
                    self._count("full_timeouts")
                raise ReplayFullError(
                    f"replay queue {self._queue} at {self._where} stayed full (max_queue_len={o.max_queue_len} "
                    f"unacked groups) for {timeout_s:.1f}s; group {group_id} was not stored"
                )
            time.sleep(o.poll_interval_s)

    def pull(self, n, consumer, block_ms=0, min_policy_version=None, keep_stale=False):
        deadline = time.monotonic() + block_ms / 1000.0
        while True:
            entries = self._retry(lambda: self._fetch(n, consumer, deadline), "pull")
            deliveries = self._deliver(entries, consumer, min_policy_version, keep_stale)
            if deliveries or (not entries and time.monotonic() >= deadline):
                return deliveries

    def _fetch(self, n: int, consumer: str, deadline: float) -> list[tuple[str, dict, bool]]:
        o = self.options
        claim = self._redis.xautoclaim(
            self._queue, o.consumer_group, consumer, min_idle_time=int(o.claim_idle_s * 1000), start_id="0-0", count=n
        )
        entries = [(_text(eid), fields, True) for eid, fields in claim[1] if fields]
        if len(entries) < n:
            remaining_ms = (deadline - time.monotonic()) * 1000
            block = None if entries or remaining_ms < 1 else int(max(1, min(remaining_ms, o.socket_timeout_s * 500)))
            response = self._redis.xreadgroup(
                o.consumer_group, consumer, {self._queue: ">"}, count=n - len(entries), block=block
            )
            for _, stream_entries in response or []:
                entries.extend((_text(eid), fields, False) for eid, fields in stream_entries if fields)
        return entries

    def _deliver(self, entries, consumer, min_version, keep_stale) -> list[Delivery]:
        parsed, corrupt = [], []
        for eid, fields, redelivered in entries:
            try:
                gid, pv = fields[b"gid"].decode(), int(fields[b"pv"])
                token, chunks, nbytes = fields[b"token"].decode(), int(fields[b"chunks"]), int(fields[b"nbytes"])
            except (KeyError, ValueError, UnicodeDecodeError):
                corrupt.append((eid, "?", [], "malformed stream entry"))
                continue
            parsed.append((eid, gid, pv, self._blob_keys(token, chunks), nbytes, redelivered))
        if parsed:
            applied = self._retry(lambda: self._redis.smismember(self._applied, [p[1] for p in parsed]), "pull")
        wanted, seen = [], set()
        for (eid, gid, pv, keys, nbytes, redelivered), is_applied in zip(parsed, applied if parsed else []):
            stale = min_version is not None and pv < min_version
            if is_applied or gid in seen:  # applied already, or a second copy in this same batch
                self._finish(eid, keys, "duplicates_skipped")
            elif stale and not keep_stale:
                self._finish(eid, keys, "stale_dropped")
            else:
                if stale:
                    self._count("stale_kept")
                seen.add(gid)
                wanted.append((eid, gid, keys, nbytes, redelivered, stale))

        def get_all() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for w in wanted:
                for key in w[2]:
                    pipe.get(key)
            return pipe.execute()

        values = self._retry(get_all, "pull") if wanted else []
        deliveries, at = [], 0
        for eid, gid, keys, nbytes, redelivered, stale in wanted:
            pieces, at = values[at : at + len(keys)], at + len(keys)
            try:
                group = self._assemble(eid, gid, pieces, nbytes)
            except CorruptRecordError as err:
                corrupt.append((eid, gid, keys, str(err)))
                continue
            if group is not None:
                deliveries.append(Delivery(group, eid, consumer, redelivered, stale, handle=keys))
        for eid, gid, keys, reason in corrupt:
            self._finish(eid, keys, "corrupt", dead_letter={"entry": eid, "gid": gid, "reason": reason})
        return deliveries

    def _assemble(self, eid: str, gid: str, pieces: list[bytes | None], nbytes: int):
        if any(p is None for p in pieces):
            gone = self._retry(lambda: not self._redis.xrange(self._queue, eid, eid), "pull")
            if gone or self.is_applied(gid):
                return None  # acked meanwhile by the consumer it was reclaimed from
            raise CorruptRecordError("truncated", f"payload chunk of {gid} is missing")
        if sum(len(p) for p in pieces) != nbytes:
            found = sum(len(p) for p in pieces)
            raise CorruptRecordError("truncated", f"payload of {gid} has {found} bytes, entry says {nbytes}")
        payload = bytearray(nbytes)
        at = 0
        for p in pieces:
            payload[at : at + len(p)] = p
            at += len(p)
        group = decode(payload)
        if group.group_id != gid:
            raise CorruptRecordError("header", f"stream entry says group {gid}, payload says {group.group_id}")
        return group

    def _finish(self, eid: str, keys: list[str], counter: str, dead_letter: dict | None = None) -> None:
        """Remove an entry without applying it (duplicate, stale or corrupt)."""

        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.xack(self._queue, self.options.consumer_group, eid)
            pipe.xdel(self._queue, eid)
            if keys:
                pipe.unlink(*keys)
            pipe.hincrby(self._stats_key, counter, 1)
            if dead_letter is not None:
                pipe.xadd(self._dead, dead_letter, maxlen=self.options.dead_letter_max_len, approximate=False)
            pipe.execute()

        self._retry(run, "pull")

    def ack(self, delivery: Delivery) -> bool:
        keys = [self._queue, self._applied, self._stats_key, *(delivery.handle or [])]
        args = [self.options.consumer_group, delivery.entry_id, delivery.group_id]
        return bool(self._retry(lambda: self._ack(keys=keys, args=args), "ack"))

    def is_applied(self, group_id: str) -> bool:
        return bool(self._retry(lambda: self._redis.sismember(self._applied, group_id), "is_applied"))

    def drain(self) -> int:
        def batch() -> int:
            entries = self._redis.xrange(self._queue, "-", "+", count=500)
            if not entries:
                return 0
            pipe = self._redis.pipeline(transaction=True)
            for eid, fields in entries:
                pipe.xack(self._queue, self.options.consumer_group, eid)
                pipe.xdel(self._queue, eid)
                with contextlib.suppress(KeyError, ValueError):
                    keys = self._blob_keys(fields[b"token"].decode(), int(fields[b"chunks"]))
                    if keys:
                        pipe.unlink(*keys)
            pipe.hincrby(self._stats_key, "drained", len(entries))
            pipe.execute()
            return len(entries)

        total = 0
        while count := self._retry(batch, "drain"):
            total += count
        return total

    # ---- buffer ------------------------------------------------------------------------------
    def _buffer_add_encoded(self, payload, group_id) -> bool:
        cap = self.options.buffer_max_size or 0
        while True:
            token, keys, size = self._write_blobs(payload, 3600, f"buffer_add of group {group_id}")
            args = [group_id, f"{token} {len(keys)} {size}", cap]
            script_keys = [self._buffer, self._stats_key, self._seq, *keys]
            result = self._retry(lambda: self._buffer_admit(keys=script_keys, args=args), "buffer_add")
            if result == 1:
                return True
            self._delete_quietly(keys)
            if result == 0:
                return False
            if result == -1:
                raise ReplayFullError(
                    f"replay buffer {self._buffer} holds buffer_max_size={cap} groups; {group_id} not added"
                )

    def _table(self, raw: dict[bytes, bytes]) -> dict[str, tuple[int, list[str], int]]:
        table = {}
        for gid, meta in raw.items():
            seq, token, chunks, nbytes = meta.decode().split(" ")
            table[gid.decode()] = (int(seq), self._blob_keys(token, int(chunks)), int(nbytes))
        return table

    def buffer_sample(self, n, rng=None):
        rng = as_rng(rng)
        saved = rng.bit_generator.state

        def draw():
            rng.bit_generator.state = saved  # a retried transaction repeats the same draws
            with self._redis.pipeline() as pipe:
                pipe.watch(self._buffer, self._sampled)
                table = self._table(pipe.hgetall(self._buffer))
                counts = {k.decode(): int(v) for k, v in pipe.hgetall(self._sampled).items()}
                ids = sorted(table, key=lambda gid: table[gid][0])
                draws, touched, removed = draw_with_replacement(ids, counts, n, rng, self.options.max_times_sampled)
                pipe.multi()
                for gid, count in touched.items():
                    pipe.hset(self._sampled, gid, count)
                if removed:
                    pipe.hdel(self._buffer, *removed)
                    pipe.hdel(self._sampled, *removed)
                    pipe.hincrby(self._stats_key, "buffer_removed", len(removed))
                pipe.execute()
                return table, draws, removed

        while True:
            try:
                table, draws, removed = self._retry(draw, "buffer_sample")
                break
            except redis.WatchError:
                continue
        distinct = list(dict.fromkeys(draws))

        def get_all() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for gid in distinct:
                for key in table[gid][1]:
                    pipe.get(key)
            return pipe.execute()

        values = self._retry(get_all, "buffer_sample") if distinct else []
        for gid in removed:
            self._delete_quietly(table[gid][1])
        groups, at = {}, 0
        for gid in distinct:
            _, keys, nbytes = table[gid]
            pieces, at = values[at : at + len(keys)], at + len(keys)
            try:
                if any(p is None for p in pieces) or sum(len(p) for p in pieces) != nbytes:
                    raise CorruptRecordError("truncated", f"buffer payload of {gid} is incomplete")
                groups[gid] = decode(bytearray(b"".join(pieces)))
            except CorruptRecordError:
                self._forget_buffer_entry(gid)
                self._delete_quietly(keys)
                self._count("corrupt")
        return [groups[gid] for gid in draws if gid in groups]

    def _forget_buffer_entry(self, group_id: str) -> None:
        def run() -> None:
            self._redis.pipeline().hdel(self._buffer, group_id).hdel(self._sampled, group_id).execute()

        self._retry(run, "buffer_sample")

    def buffer_size(self) -> int:
        return int(self._retry(lambda: self._redis.hlen(self._buffer), "buffer_size"))

    def _buffer_payloads(self):
        table = self._table(self._retry(lambda: self._redis.hgetall(self._buffer), "export"))
        out = []
        for gid in sorted(table, key=lambda g: table[g][0]):
            pieces = self._retry(lambda: self._redis.mget(table[gid][1]), "export")
            out.append((gid, b"".join(p for p in pieces if p is not None)))
        return out

    # ---- operations --------------------------------------------------------------------------
    def stats(self) -> ReplayStats:
        def read():
            pipe = self._redis.pipeline(transaction=False)
            pipe.xlen(self._queue)
            pipe.xinfo_groups(self._queue)
            pipe.hlen(self._buffer)
            pipe.xlen(self._dead)
            pipe.hgetall(self._stats_key)
            return pipe.execute()

        qlen, groups, blen, dead, counters = self._retry(read, "stats")
        pending = sum(int(g["pending"]) for g in groups if _text(g["name"]) == self.options.consumer_group)
        values = {c: int(counters.get(c.encode(), 0)) for c in COUNTERS}
        return ReplayStats(queue_length=qlen, pending=pending, buffer_size=blen, dead_letters=dead, **values)

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        entries = self._retry(lambda: self._redis.xrevrange(self._dead, count=count), "dead_letters")
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]

    def close(self) -> None:
        self._redis.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
