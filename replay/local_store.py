"""An embedded replay store: Arrow files in a directory, shared by processes on one machine.

Layout of the directory:
    state.json      the index (queue entries, buffer table, applied group ids, counters, run epoch)
    lock            fcntl lock taken around every change of the index
    entries/        one Arrow IPC file per queued group
    buffer/         one Arrow IPC file per buffer entry
    dead/           corrupt queue entries (payload kept), with a `.reason` JSON file next to each

Payload files are written under a temporary name and renamed into place before the index names
them, and the index is replaced atomically, so a process killed at any point leaves a readable store.
Every change of the index checks the run epoch (replay.store_epoch): an index that is gone or was
replaced raises `StoreLostError` instead of starting an empty one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from replay.bounds import check_payload_size
from replay.codec import CorruptRecordError, decode
from replay.store import (
    COUNTERS,
    Delivery,
    ReplayFullError,
    ReplayStats,
    ReplayStore,
    StoreOptions,
    as_rng,
    draw_with_replacement,
)
from replay.store_epoch import check_epoch, lost_error, new_epoch


def _empty_state() -> dict[str, Any]:
    return {"seq": 0, "queue": {}, "buffer": {}, "applied": [], "dead": [], "stats": {c: 0 for c in COUNTERS}}


def _read_file(path: Path, max_record_bytes: int | None = None) -> bytearray:
    """The file's bytes; a file above the record ceiling is refused (CorruptRecordError) unread."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if max_record_bytes is not None:
            check_payload_size(size, max_record_bytes, f"payload file {path.name}")
        out = bytearray(size)
        if f.readinto(out) != size:
            raise OSError(f"{path} changed size while read")
        return out


class LocalStore(ReplayStore):
    def __init__(self, root: str | Path, options: StoreOptions | None = None):
        self.options = options or StoreOptions()
        self.root = Path(root)
        for sub in ("entries", "buffer", "dead"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._state_path = self.root / "state.json"
        self._lock_path = self.root / "lock"
        self._thread_lock = threading.Lock()
        self._epoch: str | None = None
        with self._locked() as state:
            found = state.get("epoch")
            if found is None and self.options.epoch is None:  # a new store (or one from before epochs)
                state["epoch"] = found = new_epoch()
            check_epoch(repr(self), self.options.epoch, found, "open")
        self._epoch = found

    @property
    def epoch(self) -> str:
        return self._epoch

    # ---- index -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the directory lock; yields the index, saved atomically on a clean exit."""
        with self._thread_lock, open(self._lock_path, "a+") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                state = json.loads(self._state_path.read_text()) if self._state_path.exists() else _empty_state()
                if self._epoch is not None and state.get("epoch") != self._epoch:
                    raise lost_error(repr(self), self._epoch, state.get("epoch"), "an index update")
                before = json.dumps(state, sort_keys=True)
                yield state
                after = json.dumps(state, sort_keys=True)
                if after != before:
                    tmp = self._state_path.with_name(f"state.{uuid.uuid4().hex}.tmp")
                    tmp.write_text(after)
                    tmp.replace(self._state_path)
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _write_payload(self, sub: str, payload: bytes | bytearray) -> str:
        name = f"{uuid.uuid4().hex}.arrow"
        tmp = self.root / sub / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
        tmp.replace(self.root / sub / name)
        return name

    def _unlink(self, sub: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / sub / name).unlink()

    def _count(self, counter: str, amount: int = 1) -> None:
        with self._locked() as state:
            _bump(state, counter, amount)

    # ---- queue -------------------------------------------------------------------------------
    def push_encoded(self, payload, group_id, policy_version, timeout_s=None):
        timeout_s = self.options.push_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        name = self._write_payload("entries", payload)
        while True:
            with self._locked() as state:
                if group_id in state["applied"]:
                    state["stats"]["refused_applied"] += 1
                    self._unlink("entries", name)
                    return None
                if len(state["queue"]) < self.options.max_queue_len:
                    state["seq"] += 1
                    entry_id = f"{state['seq']:012d}"
                    state["queue"][entry_id] = {
                        "group_id": group_id,
                        "policy_version": int(policy_version),
                        "file": name,
                        "consumer": None,
                        "delivered_at": None,
                        "deliveries": 0,
                    }
                    state["stats"]["pushed"] += 1
                    return entry_id
                timed_out = time.monotonic() >= deadline
                if timed_out:
                    state["stats"]["full_timeouts"] += 1
                    self._unlink("entries", name)
            if timed_out:  # raised outside the lock block so the counter is saved
                raise ReplayFullError(
                    f"replay queue at {self.root} stayed full (max_queue_len={self.options.max_queue_len} "
                    f"unacked groups) for {timeout_s:.1f}s; group {group_id} was not stored"
                )
            time.sleep(self.options.poll_interval_s)

    def pull(self, n, consumer, block_ms=0, min_policy_version=None, keep_stale=False):
        deadline = time.monotonic() + block_ms / 1000.0
        while True:
            claimed = self._claim(n, consumer, min_policy_version, keep_stale)
            deliveries = self._load(claimed, consumer)
            if deliveries or (not claimed and time.monotonic() >= deadline):
                return deliveries
            if not claimed:
                time.sleep(min(self.options.poll_interval_s, max(0.0, deadline - time.monotonic())))

    def _claim(self, n, consumer, min_version, keep_stale) -> list[tuple[str, dict[str, Any], bool]]:
        now = time.time()
        claimed = []
        with self._locked() as state:
            applied = set(state["applied"])
            idle = [
                eid for eid, e in state["queue"].items()
                if e["consumer"] is not None and now - e["delivered_at"] >= self.options.claim_idle_s
            ]
            ready = [eid for eid, e in state["queue"].items() if e["consumer"] is None]
            for eid in sorted(idle) + sorted(ready):
                if len(claimed) >= n:
                    break
                entry = state["queue"][eid]
                if entry["group_id"] in applied:
                    self._remove_entry(state, eid, "duplicates_skipped")
                    continue
                applied.add(entry["group_id"])  # a second copy in this same batch is a duplicate too
                stale = min_version is not None and entry["policy_version"] < min_version
                if stale and not keep_stale:
                    self._remove_entry(state, eid, "stale_dropped")
                    continue
                if stale:
                    state["stats"]["stale_kept"] += 1
                redelivered = entry["consumer"] is not None
                entry.update(consumer=consumer, delivered_at=now, deliveries=entry["deliveries"] + 1)
                claimed.append((eid, dict(entry, stale=stale), redelivered))
        return claimed

    def _remove_entry(self, state: dict[str, Any], entry_id: str, counter: str) -> None:
        entry = state["queue"].pop(entry_id)
        self._unlink("entries", entry["file"])
        state["stats"][counter] += 1

    def _load(self, claimed, consumer) -> list[Delivery]:
        deliveries, corrupt = [], []
        for eid, entry, redelivered in claimed:
            try:
                payload = _read_file(self.root / "entries" / entry["file"], self.options.max_record_bytes)
            except CorruptRecordError as err:
                corrupt.append((eid, entry, str(err)))
                continue
            except FileNotFoundError:
                # Usually acked meanwhile by the consumer we reclaimed it from (then the index no longer
                # holds it and the dead-letter step skips it); otherwise the file was lost at rest.
                corrupt.append((eid, entry, "payload file missing"))
                continue
            try:
                group = decode(payload, self.options.max_record_bytes)
                if group.group_id != entry["group_id"]:
                    raise CorruptRecordError("header", f"entry says {entry['group_id']}, payload says {group.group_id}")
            except CorruptRecordError as err:
                corrupt.append((eid, entry, str(err)))
                continue
            deliveries.append(Delivery(group, eid, consumer, redelivered, entry["stale"], handle=entry["file"]))
        if corrupt:
            self._dead_letter(corrupt)
        return deliveries

    def _dead_letter(self, corrupt, counter: str = "corrupt") -> None:
        with self._locked() as state:
            for eid, entry, reason in corrupt:
                if state["queue"].pop(eid, None) is None:
                    continue
                name = f"{eid}-{entry['file']}"
                with contextlib.suppress(FileNotFoundError):
                    (self.root / "entries" / entry["file"]).replace(self.root / "dead" / name)
                letter = {"entry": eid, "gid": entry["group_id"], "reason": reason}
                (self.root / "dead" / f"{name}.reason").write_text(json.dumps(letter))
                state["dead"].append(name)
                _bump(state, counter)
            self._trim_dead(state)

    def _trim_dead(self, state: dict[str, Any]) -> None:
        while len(state["dead"]) > self.options.dead_letter_max_len:
            old = state["dead"].pop(0)
            self._unlink("dead", old)
            self._unlink("dead", f"{old}.reason")

    def mark_applied(self, group_ids: list[str]) -> int:
        with self._locked() as state:
            new = [g for g in dict.fromkeys(group_ids) if g not in set(state["applied"])]
            state["applied"].extend(new)
            return len(new)

    def quarantine(self, delivery: Delivery, reason: str) -> None:
        entry = {"group_id": delivery.group_id, "file": delivery.handle}
        self._dead_letter([(delivery.entry_id, entry, reason)], counter="quarantined")

    def buffer_quarantine(self, group_id: str, reason: str) -> None:
        with self._locked() as state:
            entry = state["buffer"].pop(group_id, None)
            if entry is None:
                return
            name = f"buffer-{entry['file']}"
            with contextlib.suppress(FileNotFoundError):
                (self.root / "buffer" / entry["file"]).replace(self.root / "dead" / name)
            letter = {"entry": "buffer", "gid": group_id, "reason": reason}
            (self.root / "dead" / f"{name}.reason").write_text(json.dumps(letter))
            state["dead"].append(name)
            _bump(state, "quarantined")
            self._trim_dead(state)

    def ack(self, delivery: Delivery) -> bool:
        with self._locked() as state:
            first = delivery.group_id not in state["applied"]
            if first:
                state["applied"].append(delivery.group_id)
                state["stats"]["acked"] += 1
            entry = state["queue"].get(delivery.entry_id)
            if entry is not None and entry["group_id"] == delivery.group_id:
                state["queue"].pop(delivery.entry_id)
                self._unlink("entries", entry["file"])
            return first

    def is_applied(self, group_id: str) -> bool:
        with self._locked() as state:
            return group_id in state["applied"]

    def drain(self) -> int:
        with self._locked() as state:
            count = len(state["queue"])
            for eid in list(state["queue"]):
                self._remove_entry(state, eid, "drained")
            return count

    # ---- buffer ------------------------------------------------------------------------------
    def _buffer_add_encoded(self, payload, group_id) -> bool:
        name = self._write_payload("buffer", payload)
        with self._locked() as state:
            table = state["buffer"]
            if group_id in table:
                self._unlink("buffer", name)
                return False
            cap = self.options.buffer_max_size
            if cap is not None and len(table) >= cap:
                self._unlink("buffer", name)
                raise ReplayFullError(
                    f"replay buffer at {self.root} holds buffer_max_size={cap} groups; {group_id} not added"
                )
            state["seq"] += 1
            table[group_id] = {"file": name, "seq": state["seq"], "sampled": 0}
            state["stats"]["buffer_added"] += 1
            return True

    def buffer_sample(self, n, rng=None):
        rng = as_rng(rng)
        payloads: dict[str, bytearray] = {}
        with self._locked() as state:
            table = state["buffer"]
            ids = sorted(table, key=lambda gid: table[gid]["seq"])
            counts = {gid: table[gid]["sampled"] for gid in ids}
            draws, touched, removed = draw_with_replacement(ids, counts, n, rng, self.options.max_times_sampled)
            for gid in set(draws):
                try:
                    payloads[gid] = _read_file(self.root / "buffer" / table[gid]["file"], self.options.max_record_bytes)
                except CorruptRecordError:
                    payloads[gid] = bytearray()  # refused unread; decoded as corrupt below
            for gid, count in touched.items():
                table[gid]["sampled"] = count
            for gid in removed:
                self._unlink("buffer", table.pop(gid)["file"])
                state["stats"]["buffer_removed"] += 1
        groups, bad = {}, []
        for gid, payload in payloads.items():
            try:
                groups[gid] = decode(payload, self.options.max_record_bytes)
            except CorruptRecordError:
                bad.append(gid)
        if bad:
            with self._locked() as state:
                for gid in bad:
                    entry = state["buffer"].pop(gid, None)
                    if entry is not None:
                        self._unlink("buffer", entry["file"])
                    state["stats"]["corrupt"] += 1
        return [groups[gid] for gid in draws if gid in groups]

    def buffer_size(self) -> int:
        with self._locked() as state:
            return len(state["buffer"])

    def _buffer_payloads(self):
        with self._locked() as state:
            table = state["buffer"]
            names = [(gid, table[gid]["file"]) for gid in sorted(table, key=lambda g: table[g]["seq"])]
            return [(gid, _read_file(self.root / "buffer" / name)) for gid, name in names]

    # ---- operations --------------------------------------------------------------------------
    def stats(self) -> ReplayStats:
        with self._locked() as state:
            pending = sum(1 for e in state["queue"].values() if e["consumer"] is not None)
            return ReplayStats(
                queue_length=len(state["queue"]),
                pending=pending,
                buffer_size=len(state["buffer"]),
                dead_letters=len(state["dead"]),
                **state["stats"],
            )

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        with self._locked() as state:
            names = state["dead"][-count:][::-1]
        return [json.loads((self.root / "dead" / f"{name}.reason").read_text()) for name in names]

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"


def _bump(state: dict[str, Any], counter: str, amount: int = 1) -> None:
    state["stats"][counter] = state["stats"].get(counter, 0) + amount  # an index from before a counter existed
