"""The Redis replay store: the queue is a Redis Stream with a consumer group, payloads live in blob keys.

Keys, all under the store's prefix:
    queue                   stream; one small entry per group: gid, pv, token, chunks, nbytes
    blob:<token>:<i>        the payload bytes, split into `chunk_bytes` pieces (Redis caps a value at 512 MB)
    admitted:<token>        marks a push as done, so a push retried after a lost reply is not added twice
    applied                 set of applied group ids (exactly-once application over at-least-once delivery)
    stats                   hash of counters
    dead                    stream of dead letters: entry id, group id, reason (the payload is dropped)
    epoch                   the run epoch, written with the stream (replay.store_epoch)
    buffer                  hash: group id -> "seq token chunks nbytes"
    buffer:sampled          hash: group id -> times sampled
    buffer:seq              insertion counter (sampling order is insertion order, so a seeded rng repeats)

Blob keys are written with an expiry, only while the epoch is this run's, and made persistent by the same Lua script that admits the
entry, so a producer that dies halfway leaves nothing behind for long. The admission script checks
the queue length, so the bound holds with any number of producers. An entry stays in the stream
until acked (ack = XACK + XDEL), so XLEN is the number of unacked groups. A vanished stream, or an
epoch that is missing or different, is never recreated: it raises `StoreLostError`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, Callable, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from replay.bounds import check_chunked_entry
from replay.codec import CorruptRecordError, decode
from replay.redis_buffer import RedisBuffer
from replay.redis_scripts import ACK, ADMIT, BUFFER_ADD, OPEN
from replay.store import (
    COUNTERS,
    Delivery,
    ReplayError,
    ReplayFullError,
    ReplayStats,
    ReplayStore,
    ReplayUnavailableError,
    StoreLostError,
    StoreOptions,
)
from replay.store_epoch import check_epoch, lost_error, new_epoch

T = TypeVar("T")

UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


class RedisStore(RedisBuffer, ReplayStore):
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
        self._open_script = self._redis.register_script(OPEN)
        self._epoch_key = p + "epoch"
        self._epoch: str = o.epoch or ""
        self._retry(self._open, "connect")

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self.options.prefix!r})"

    # ---- plumbing ----------------------------------------------------------------------------
    @property
    def epoch(self) -> str:
        return self._epoch

    def _open(self) -> None:
        """Adopt (or, for a new store, write) the run epoch; check it against the expected one."""
        created = "" if self.options.epoch is not None else new_epoch()  # an expected store is never created
        found = self._open_script(keys=[self._epoch_key, self._queue], args=[created, self.options.consumer_group])
        if found is None:  # a queue written before stores had epochs: give it one, unless one was expected
            if self.options.epoch is not None:
                raise self._lost("connect", None)
            self._redis.set(self._epoch_key, new_epoch(), nx=True)
            found = self._redis.get(self._epoch_key)
        check_epoch(self._location, self.options.epoch, _text(found), "connect")
        self._epoch = _text(found)
        if not self._redis.exists(self._queue):
            raise self._lost("connect", self._epoch, "its queue stream is gone")
        try:
            self._redis.xgroup_create(self._queue, self.options.consumer_group, id="0")
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    @property
    def _location(self) -> str:
        return f"at {self._where} (prefix {self.options.prefix!r})"

    def _lost(self, during: str, found: str | None | bool = False, detail: str = "") -> StoreLostError:
        """The error for a store that is not this run's any more (reads its epoch unless given)."""
        if found is False:
            with contextlib.suppress(*UNAVAILABLE):
                found = self._redis.get(self._epoch_key)
            found = None if found in (False, None) else _text(found)
        err = lost_error(self._location, self._epoch or "(none yet)", found, during)
        return StoreLostError(f"{err} ({detail})") if detail else err

    def _verify_epoch(self, during: str, client: Any = None) -> None:
        """StoreLostError unless this run's epoch is there (read through `client`: a WATCHing pipeline)."""
        found = (client or self._redis).get(self._epoch_key)
        if found is None or _text(found) != self._epoch:
            raise self._lost(during, None if found is None else _text(found))

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn`, retrying connection failures with exponential backoff, then ReplayUnavailableError."""
        o = self.options
        delay, start, last = o.retry_backoff_s, time.monotonic(), None
        for attempt in range(o.retry_attempts):
            try:
                if last is not None and self._epoch:  # reconnecting: is it still this run's store?
                    self._verify_epoch(what)
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
                    raise
                # The stream vanished (a Redis restarted without persistence): never recreated.
                raise self._lost(what, detail="its queue stream is gone") from None
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
            # Written only while the store still has this run's epoch (WATCH + MULTI): a producer racing a
            # store that lost its data must not leave blobs in the emptied store.
            with self._redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self._epoch_key)
                    self._verify_epoch(what, pipe)
                    pipe.multi()
                    for key, piece in zip(keys, pieces):
                        pipe.set(key, piece, ex=ttl_s)
                    pipe.execute()
                except redis.WatchError:
                    raise self._lost(what) from None

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
            args = [o.max_queue_len, group_id, int(policy_version), token, len(keys), size, ttl, self._epoch]
            script_keys = [self._queue, self._applied, self._stats_key, marker, self._epoch_key, *keys]
            result = self._retry(lambda: self._admit(keys=script_keys, args=args), what)
            if result == b"epoch":
                self._delete_quietly(keys)
                raise self._lost(f"push of group {group_id}")
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
            try:  # before a key is named or a byte fetched: a claim of 10^6 chunks is refused here
                check_chunked_entry(chunks, nbytes, self.options.max_record_bytes, self.options.chunk_bytes,
                                    f"stream entry {eid} ({gid})")
            except CorruptRecordError as err:
                corrupt.append((eid, gid, [], str(err)))
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
        group = decode(payload, self.options.max_record_bytes)
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
        keys = [self._queue, self._applied, self._stats_key, self._epoch_key, *(delivery.handle or [])]
        args = [self.options.consumer_group, delivery.entry_id, delivery.group_id, self._epoch]
        result = self._retry(lambda: self._ack(keys=keys, args=args), "ack")
        if result == b"epoch":
            raise self._lost(f"ack of group {delivery.group_id}")
        return bool(result)

    def mark_applied(self, group_ids: list[str]) -> int:
        pieces = [group_ids[i : i + 10_000] for i in range(0, len(group_ids), 10_000)]
        return sum(int(self._retry(lambda p=p: self._redis.sadd(self._applied, *p), "mark_applied")) for p in pieces)

    def quarantine(self, delivery: Delivery, reason: str) -> None:
        letter = {"entry": delivery.entry_id, "gid": delivery.group_id, "reason": reason}
        self._finish(delivery.entry_id, list(delivery.handle or []), "quarantined", dead_letter=letter)

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
