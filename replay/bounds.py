"""Resource bounds of a stored record, checked before anything of its claimed size is allocated.

A queue entry (Redis) or a payload file (local store) says how large its record is before the
record is read; a reader refuses a claim above its ceiling (`StoreOptions.max_record_bytes` plus the
codec's framing allowance) at once, as a corrupt record with reason `bounds`, instead of fetching
a million blob keys or reading a file of any size. The codec then bounds the tensors' declared
shapes by the same ceiling (`replay.codec.decode(max_bytes=...)`).
"""

from __future__ import annotations

from replay.codec import CorruptRecordError
from replay.store import check_payload_size  # noqa: F401  (the bound of one payload, with the chunked one)


def check_chunked_entry(chunks: int, nbytes: int, max_record_bytes: int, chunk_bytes: int, what: str) -> None:
    """A chunked payload's claim: a size within the ceiling, in no more pieces than `chunk_bytes` pieces
    of that size (every process of a run uses the same `chunk_bytes`: it is in the store URL)."""
    check_payload_size(nbytes, max_record_bytes, what)
    most = max(1, -(-nbytes // chunk_bytes))
    if not 1 <= chunks <= most:
        raise CorruptRecordError(
            "bounds", f"{what} claims {chunks} chunks for {nbytes} bytes (at most {most} of chunk_bytes={chunk_bytes})"
        )
