"""The replay store interface shared by the Redis and the local-file backends.

Two structures live in one store:
- the on-policy QUEUE: at-least-once delivery with acks, redelivery of groups a dead consumer never
  acked, exactly-once *application* through an `applied` set of group ids, a bounded length with
  back-pressure on producers (`ReplayFullError` after `push_timeout_s`, never a silent drop), corrupt
  entries counted and moved to a dead-letter list, and a staleness filter on policy versions;
- the semi-on-policy BUFFER: a fixed table sampled uniformly with replacement, with an optional
  `max_times_sampled` after which an entry is removed, exportable to and importable from Arrow files.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from replay.codec import ENVELOPE_BYTES, CorruptRecordError, decode, encode
from replay.record import CandidateGroup


class ReplayError(RuntimeError):
    """Base class of the store's operational errors."""


class ReplayFullError(ReplayError):
    """The queue (or buffer) stayed full for the whole push timeout; the group was NOT stored."""


class ReplayUnavailableError(ReplayError):
    """The backend could not be reached after bounded retries; the operation did not take effect."""


class StoreLostError(ReplayError):
    """The store is not the one this run created (its run epoch is missing or different): the backend
    lost its data (e.g. Redis restarted without persistence). Never retried: the run must stop."""


class StoreOptions(BaseModel):
    """Options of every store; unknown names are rejected (a URL query parameter or a keyword)."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = "arcopo:replay:"  # Redis key prefix (the local store ignores it)
    max_queue_len: int = Field(64, ge=1)  # groups pushed but not yet acked
    push_timeout_s: float = Field(60.0, ge=0.0)  # how long push waits for room before ReplayFullError
    claim_idle_s: float = Field(300.0, gt=0.0)  # a delivery not acked for this long is redelivered
    poll_interval_s: float = Field(0.05, gt=0.0)
    chunk_bytes: int = Field(64 << 20, ge=1024)  # Redis payloads above this are split over several keys
    max_times_sampled: int | None = Field(None, ge=1)
    buffer_max_size: int | None = Field(None, ge=1)
    retry_attempts: int = Field(5, ge=1)  # tries of one Redis operation before ReplayUnavailableError
    retry_backoff_s: float = Field(0.1, ge=0.0)  # first wait, doubled each retry
    retry_backoff_max_s: float = Field(2.0, ge=0.0)
    socket_timeout_s: float = Field(10.0, gt=0.0)
    consumer_group: str = "learner"
    dead_letter_max_len: int = Field(1000, ge=1)
    # Largest record (bytes of its tensors, and of its stored payload) a reader accepts; checked
    # before anything of that size is allocated. The learner lowers it to its policy's geometry.
    max_record_bytes: int = Field(4 << 30, ge=1024)
    # The run epoch this process expects (set by the driver once the store exists); None: adopt the
    # store's epoch, or write one if the store is new.
    epoch: str | None = Field(None, min_length=1)


@dataclass(frozen=True)
class Delivery:
    """One group handed to a consumer; pass it back to `ack` after the update that used it."""

    group: CandidateGroup
    entry_id: str
    consumer: str
    redelivered: bool = False  # reclaimed from a consumer that did not ack in time
    stale: bool = False  # older than `min_policy_version`, delivered because keep_stale=True
    handle: Any = field(default=None, repr=False, compare=False)  # backend bookkeeping

    @property
    def group_id(self) -> str:
        return self.group.group_id


class ReplayStats(BaseModel):
    queue_length: int  # pushed and not yet acked (ready + pending)
    pending: int  # delivered, not yet acked
    buffer_size: int
    dead_letters: int
    pushed: int = 0
    acked: int = 0
    corrupt: int = 0
    duplicates_skipped: int = 0
    stale_dropped: int = 0
    stale_kept: int = 0
    drained: int = 0
    refused_applied: int = 0
    full_timeouts: int = 0
    buffer_added: int = 0
    buffer_removed: int = 0
    quarantined: int = 0  # decodable groups the learner refused (dead-lettered with the reason)


GAUGES = {"queue_length", "pending", "buffer_size", "dead_letters"}
COUNTERS = tuple(name for name in ReplayStats.model_fields if name not in GAUGES)


def min_policy_version(current_version: int, max_lag: int) -> int:
    """The oldest policy version a learner at `current_version` accepts with a lag of `max_lag`."""
    return current_version - max_lag


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def draw_with_replacement(
    ids: list[str], counts: dict[str, int], n: int, rng: np.random.Generator, max_times: int | None
) -> tuple[list[str], dict[str, int], list[str]]:
    """Draw `n` ids one at a time, uniformly among those still in the table.

    Returns (draws in order, updated times-sampled counts of the drawn ids, ids removed because they
    reached `max_times`). Fewer than `n` draws come back only when the table runs empty.
    """
    available = list(ids)
    counts = {i: counts.get(i, 0) for i in ids}
    draws, touched, removed = [], {}, []
    for _ in range(n):
        if not available:
            break
        chosen = available[int(rng.integers(len(available)))]
        draws.append(chosen)
        counts[chosen] += 1
        touched[chosen] = counts[chosen]
        if max_times is not None and counts[chosen] >= max_times:
            available.remove(chosen)
            removed.append(chosen)
    return draws, touched, removed


def check_payload_size(nbytes: int, max_record_bytes: int, what: str) -> None:
    """A stored payload's size against the reader's ceiling, before a byte of it is read."""
    ceiling = max_record_bytes + ENVELOPE_BYTES
    if not 0 < nbytes <= ceiling:
        raise CorruptRecordError("bounds", f"{what} claims {nbytes} bytes; the ceiling is {ceiling} bytes")


def export_name(index: int, group_id: str) -> str:
    return f"{index:06d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', group_id)[:64]}.arrow"


class ReplayStore(abc.ABC):
    """What the rollout workers and the learner call; see the module docstring for the semantics."""

    options: StoreOptions

    # ---- queue -------------------------------------------------------------------------------
    def push(self, group: CandidateGroup, timeout_s: float | None = None) -> str | None:
        """Append a group; returns its entry id, or None if its group id was already applied.

        Blocks while the queue holds `max_queue_len` unacked groups; raises `ReplayFullError` after
        `timeout_s` (default `push_timeout_s`). On any error the group was not stored.
        """
        return self.push_encoded(encode(group), group.group_id, group.policy_version, timeout_s)

    @abc.abstractmethod
    def push_encoded(
        self, payload: bytes | bytearray, group_id: str, policy_version: int, timeout_s: float | None = None
    ) -> str | None:
        """`push` for a payload already encoded by `replay.codec.encode` (validated when pulled)."""

    @abc.abstractmethod
    def pull(
        self,
        n: int,
        consumer: str,
        block_ms: int = 0,
        min_policy_version: int | None = None,
        keep_stale: bool = False,
    ) -> list[Delivery]:
        """Up to `n` groups for `consumer`, first reclaiming deliveries idle longer than `claim_idle_s`.

        Waits up to `block_ms` for at least one. Groups whose id was already applied are acked and
        skipped; corrupt ones are counted, dead-lettered and skipped; groups older than
        `min_policy_version` are dropped and counted (or delivered with `stale=True` if `keep_stale`).
        """

    @abc.abstractmethod
    def ack(self, delivery: Delivery) -> bool:
        """Mark the delivery's group applied and remove it; False if it was applied already."""

    @abc.abstractmethod
    def is_applied(self, group_id: str) -> bool:
        ...

    @abc.abstractmethod
    def mark_applied(self, group_ids: list[str]) -> int:
        """Add group ids applied elsewhere to the applied set (a resumed run rebuilds a lost applied set
        from its checkpoints); returns how many were not there."""

    @abc.abstractmethod
    def quarantine(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter a delivered group its consumer cannot use (with `reason`) and remove it from
        the queue without applying it, so it is never delivered again; counted as `quarantined`."""

    @abc.abstractmethod
    def buffer_quarantine(self, group_id: str, reason: str) -> None:
        """Remove a buffer entry its consumer cannot use, dead-lettered with `reason`."""

    @property
    @abc.abstractmethod
    def epoch(self) -> str:
        """This store's run epoch ("<random id>@<creation time>"), written when the store was created."""

    @abc.abstractmethod
    def drain(self) -> int:
        """Discard every queued and pending group (not the buffer, not the applied set); returns how many."""

    # ---- buffer ------------------------------------------------------------------------------
    def buffer_add(self, group: CandidateGroup) -> bool:
        """Add a group to the table; False if its group id is already there.

        Raises `ReplayFullError` when the table holds `buffer_max_size` groups (nothing is evicted).
        """
        return self._buffer_add_encoded(encode(group), group.group_id)

    @abc.abstractmethod
    def _buffer_add_encoded(self, payload: bytes | bytearray, group_id: str) -> bool:
        ...

    @abc.abstractmethod
    def buffer_sample(self, n: int, rng: np.random.Generator | int | None = None) -> list[CandidateGroup]:
        """`n` groups drawn uniformly with replacement (the same group may come back several times).

        With `max_times_sampled`, a group is removed once drawn that many times, so fewer than `n`
        come back when the table runs empty. A corrupt entry is removed, counted and skipped.
        """

    @abc.abstractmethod
    def buffer_size(self) -> int:
        ...

    @abc.abstractmethod
    def _buffer_payloads(self) -> list[tuple[str, bytes | bytearray]]:
        """(group id, payload) of every buffer entry, in insertion order."""

    # ---- operations --------------------------------------------------------------------------
    @abc.abstractmethod
    def stats(self) -> ReplayStats:
        ...

    @abc.abstractmethod
    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead letters (corrupt queue entries), newest first: `entry`, `gid`, `reason`."""

    @abc.abstractmethod
    def _count(self, counter: str, amount: int = 1) -> None:
        ...

    def export_buffer(self, directory: str | Path) -> int:
        """Write every valid buffer entry to `directory` as one Arrow IPC file each; returns how many.

        Corrupt entries are counted and left out.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = 0
        for group_id, payload in self._buffer_payloads():
            try:
                decode(payload, self.options.max_record_bytes)
            except CorruptRecordError:
                self._count("corrupt")
                continue
            target = directory / export_name(written, group_id)
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(payload)
            tmp.replace(target)
            written += 1
        return written

    def import_buffer(self, directory: str | Path) -> int:
        """Add every `*.arrow` record in `directory` to the buffer; returns how many were new.

        Every file is validated first: one corrupt file raises `CorruptRecordError` naming it and
        nothing is added.
        """
        files = sorted(Path(directory).glob("*.arrow"))
        loaded = []
        for path in files:
            try:
                check_payload_size(path.stat().st_size, self.options.max_record_bytes, f"{path.name}")
                payload = bytearray(path.read_bytes())
                group = decode(payload, self.options.max_record_bytes)
            except CorruptRecordError as err:
                raise CorruptRecordError(err.reason, f"{path}: {err}") from None
            loaded.append((group.group_id, payload))
        return sum(self._buffer_add_encoded(payload, gid) for gid, payload in loaded)

    def close(self) -> None:
        """Release connections and file handles."""

    def __enter__(self) -> ReplayStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
