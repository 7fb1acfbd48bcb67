"""The Redis store's semi-on-policy buffer (a mixin of `RedisStore`, which provides the connection,
the retries and the blob keys; see replay.redis_store for the key layout)."""

from __future__ import annotations

from typing import Any

import redis

from replay.bounds import check_chunked_entry
from replay.codec import CorruptRecordError, decode
from replay.store import ReplayFullError, as_rng, draw_with_replacement


class RedisBuffer:
    def _buffer_add_encoded(self, payload, group_id) -> bool:
        cap = self.options.buffer_max_size or 0
        while True:
            token, keys, size = self._write_blobs(payload, 3600, f"buffer_add of group {group_id}")
            args = [group_id, f"{token} {len(keys)} {size}", cap, self._epoch]
            script_keys = [self._buffer, self._stats_key, self._seq, self._epoch_key, *keys]
            result = self._retry(lambda: self._buffer_admit(keys=script_keys, args=args), "buffer_add")
            if result == b"epoch":
                self._delete_quietly(keys)
                raise self._lost(f"buffer_add of group {group_id}")
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
        """The buffer table; an entry whose claim is out of bounds gets no blob keys (it reads as corrupt)."""
        table = {}
        for gid, meta in raw.items():
            seq, token, chunks, nbytes = meta.decode().split(" ")
            try:
                check_chunked_entry(int(chunks), int(nbytes), self.options.max_record_bytes, self.options.chunk_bytes,
                                    f"buffer entry {gid!r}")
                keys = self._blob_keys(token, int(chunks))
            except CorruptRecordError:
                keys = []
            table[gid.decode()] = (int(seq), keys, int(nbytes))
        return table

    def buffer_sample(self, n, rng=None):
        rng = as_rng(rng)
        saved = rng.bit_generator.state

        def draw():
            rng.bit_generator.state = saved  # a retried transaction repeats the same draws
            with self._redis.pipeline() as pipe:
                pipe.watch(self._buffer, self._sampled)
                if pipe.get(self._epoch_key) != self._epoch.encode():
                    raise self._lost("buffer_sample")
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
                if not keys or any(p is None for p in pieces) or sum(len(p) for p in pieces) != nbytes:
                    raise CorruptRecordError("truncated", f"buffer payload of {gid} is incomplete or out of bounds")
                groups[gid] = decode(bytearray(b"".join(pieces)), self.options.max_record_bytes)
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

    def buffer_quarantine(self, group_id: str, reason: str) -> None:
        def run() -> None:
            meta = self._redis.hget(self._buffer, group_id)
            keys = self._table({group_id.encode(): meta})[group_id][1] if meta else []
            pipe = self._redis.pipeline(transaction=True)
            pipe.hdel(self._buffer, group_id)
            pipe.hdel(self._sampled, group_id)
            if keys:
                pipe.unlink(*keys)
            pipe.hincrby(self._stats_key, "quarantined", 1)
            letter = {"entry": "buffer", "gid": group_id, "reason": reason}
            pipe.xadd(self._dead, letter, maxlen=self.options.dead_letter_max_len, approximate=False)
            pipe.execute()

        self._retry(run, "buffer_quarantine")
