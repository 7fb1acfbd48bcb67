"""Arrow IPC encoding of a `CandidateGroup`: one self-describing Arrow file, one row, never pickle.

Layout of a payload (a complete Arrow IPC *file*: `pyarrow.ipc.open_file` reads it):
- schema metadata: `arcopo.record = CandidateGroup`, `arcopo.schema_version`, and
  `arcopo.checksum = blake2b-256:<hex>` over the header values and every tensor's dtype, shape and bytes;
- header columns (utf8 / int64 / uint64 / float64 / list<utf8> / list<int64>), one value each;
- tensor columns as `large_binary`, one value each holding the raw little-endian bytes, with the
  field metadata `dtype` (float32 | float16 | bfloat16 | float64 | bool) and `shape` (a JSON list).
  bfloat16 has no Arrow type, so every tensor is stored as its raw bytes with a dtype tag.
  `rewards` is one float64 tensor [heads, G] with the head names in `reward_heads`;
  `final_latents` is a null value when absent.

`decode` treats its input as untrusted: anything wrong (not Arrow, truncated, wrong schema version,
checksum mismatch, shapes that disagree with the header, a compressed body, declared tensors above
the reader's ceiling) raises `CorruptRecordError`, never another exception type; sizes are checked
from the footer, the schema and the batch's metadata before any tensor is read. With a writable
input (bytearray, writable memoryview) the returned tensors are views of the input buffer
(zero-copy); with read-only input (bytes) each tensor is copied once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import ValidationError

from replay import record as record_module
from replay.record import CandidateGroup

RECORD_TAG = b"CandidateGroup"
CHECKSUM_PREFIX = "blake2b-256:"
MAX_DIMS = 8
ENVELOPE_BYTES = 1 << 20  # Arrow framing, header and rewards of one record: a few KB, bounded generously
HASH_PIECE_BYTES = 4 << 20  # part of the checksum definition of schema version 1: never change it alone

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "bool": 1}

HEADER_COLUMNS: dict[str, pa.DataType] = {
    "group_id": pa.utf8(),
    "prompt": pa.utf8(),
    "prompt_key": pa.utf8(),
    "adapter_name": pa.utf8(),
    "policy_version": pa.int64(),
    "pivot": pa.int64(),
    "num_chunks": pa.int64(),
    "group_size": pa.int64(),
    "sigma": pa.float64(),
    "noise_seed": pa.uint64(),
    "exploration": pa.utf8(),
    "schedule_chunks": pa.list_(pa.int64()),
    "schedule_prompts": pa.list_(pa.utf8()),
    "created_at": pa.float64(),
    "reward_heads": pa.list_(pa.utf8()),
}
TENSOR_COLUMNS = ("prefix_latents", "timesteps", "pivot_inputs", "pivot_x0", "final_latents", "rewards", "reward_valid")
OPTIONAL_TENSORS = {"final_latents"}


class CorruptRecordError(ValueError):
    """A payload that is not a valid CandidateGroup record; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"corrupt replay record ({reason}): {message}")
        self.reason = reason


class UnsupportedSchemaError(CorruptRecordError):
    """A well-formed record written with a schema version this code does not read."""


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy view (no copy for a contiguous CPU tensor)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view(np.uint8)


def _piece_digest(piece: memoryview) -> bytes:
    return hashlib.blake2b(piece, digest_size=32).digest()


def _digest(header: dict[str, Any], tensors: list[tuple[str, str, list[int], Any]], version: int) -> str:
    """blake2b-256 over the header and a list of blake2b-256 digests of 4 MiB pieces of every tensor.

    Hashing pieces lets large tensors be hashed on several threads (hashlib releases the GIL).
    """
    described = {"version": version, "header": header, "tensors": [(n, d, s) for n, d, s, _ in tensors]}
    pieces = []
    for _, _, _, data in tensors:
        if data is not None:
            flat = memoryview(data).cast("B")
            pieces.extend(flat[i : i + HASH_PIECE_BYTES] for i in range(0, len(flat), HASH_PIECE_BYTES))
    if sum(len(p) for p in pieces) >= 2 * HASH_PIECE_BYTES:
        piece_digests = list(_hash_pool().map(_piece_digest, pieces))
    else:
        piece_digests = [_piece_digest(p) for p in pieces]
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
    for d in piece_digests:
        h.update(d)
    return CHECKSUM_PREFIX + h.hexdigest()


_POOL: dict[int, ThreadPoolExecutor] = {}


def _hash_pool() -> ThreadPoolExecutor:
    """One pool per process (keyed by pid: a forked child must not use its parent's dead threads)."""
    pid = os.getpid()
    if pid not in _POOL:
        _POOL.clear()
        _POOL[pid] = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="replay-hash")
    return _POOL[pid]


def _binary_array(data: np.ndarray | None) -> pa.Array:
    if data is None:
        return pa.nulls(1, pa.large_binary())
    offsets = pa.py_buffer(np.array([0, data.nbytes], dtype=np.int64))
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])


def encode(group: CandidateGroup) -> bytearray:
    """The Arrow IPC file bytes of one group (tensor bytes are copied once, into the result)."""
    version = record_module.SCHEMA_VERSION
    header = {name: getattr(group, name) for name in HEADER_COLUMNS if name != "reward_heads"}
    heads = list(group.rewards)
    header["reward_heads"] = heads
    G = group.group_size
    rewards = torch.stack([group.rewards[h] for h in heads]) if heads else torch.zeros(0, G, dtype=torch.float64)
    values = {name: getattr(group, name) for name in TENSOR_COLUMNS if name != "rewards"}
    values["rewards"] = rewards
    tensors = []
    for name in TENSOR_COLUMNS:
        t = values[name]
        if t is None:
            tensors.append((name, "", [], None))
        else:
            tensors.append((name, DTYPE_NAMES[t.dtype], [int(s) for s in t.shape], _raw_bytes(t)))
    checksum = _digest(header, tensors, version)

    fields = [pa.field(name, typ, nullable=False) for name, typ in HEADER_COLUMNS.items()]
    arrays = [pa.array([header[name]], type=typ) for name, typ in HEADER_COLUMNS.items()]
    for name, dtype, shape, data in tensors:
        meta = {} if data is None else {"dtype": dtype, "shape": json.dumps(shape)}
        fields.append(pa.field(name, pa.large_binary(), nullable=name in OPTIONAL_TENSORS, metadata=meta))
        arrays.append(_binary_array(data))
    metadata = {"arcopo.record": RECORD_TAG, "arcopo.schema_version": str(version), "arcopo.checksum": checksum}
    schema = pa.schema(fields, metadata=metadata)
    batch = pa.record_batch(arrays, schema=schema)

    mock = pa.MockOutputStream()
    with pa.ipc.new_file(mock, schema) as writer:
        writer.write_batch(batch)
    out = bytearray(mock.size())
    with pa.ipc.new_file(pa.FixedSizeBufferWriter(pa.py_buffer(out)), schema) as writer:
        writer.write_batch(batch)
    return out


def decode(payload: bytes | bytearray | memoryview, max_bytes: int | None = None) -> CandidateGroup:
    """Validate and decode one payload; raises `CorruptRecordError` for anything that is not a valid record.

    `max_bytes` bounds the tensors' total size (and the payload's, less `ENVELOPE_BYTES` of framing):
    a record declaring more is refused (reason `bounds`) before its tensors are read or allocated."""
    try:
        return _decode(payload, max_bytes)
    except CorruptRecordError:
        raise
    except ValidationError as err:
        raise CorruptRecordError("shape", _short_validation(err)) from None
    except pa.ArrowException as err:
        raise CorruptRecordError("format", f"not a readable Arrow record file or truncated ({err})") from None
    except Exception as err:  # untrusted bytes: every failure is reported as a corrupt record
        raise CorruptRecordError("format", f"{type(err).__name__}: {err}") from None


def _short_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "record"
        parts.append(f"{loc}: {e.get('msg', '')}")
    return "; ".join(parts)


def _decode(payload: bytes | bytearray | memoryview, max_bytes: int | None) -> CandidateGroup:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CorruptRecordError("format", f"payload must be bytes-like, got {type(payload).__name__}")
    view = memoryview(payload).cast("B") if isinstance(payload, memoryview) else memoryview(payload)
    writable = not view.readonly
    if len(view) < 16:
        raise CorruptRecordError("truncated", f"{len(view)} bytes is too short for an Arrow file")
    if max_bytes is not None and len(view) > max_bytes + ENVELOPE_BYTES:
        raise CorruptRecordError("bounds", f"payload of {len(view)} bytes exceeds the ceiling of {max_bytes} bytes")
    buf = pa.py_buffer(view)
    reader = pa.ipc.open_file(buf)  # reads the footer and the schema only
    if reader.num_record_batches != 1:
        raise CorruptRecordError("format", f"expected 1 record batch, found {reader.num_record_batches}")
    schema = reader.schema
    _check_schema(schema)
    _check_declared_size(schema, max_bytes)
    batch = pa.ipc.read_record_batch(_uncompressed_batch_message(buf), schema)
    batch.validate(full=True)
    if batch.num_rows != 1:
        raise CorruptRecordError("format", f"expected 1 row, found {batch.num_rows}")
    meta = schema.metadata or {}

    header: dict[str, Any] = {}
    for name, typ in HEADER_COLUMNS.items():
        column = batch.column(name)
        if column.type != typ or column.null_count:
            raise CorruptRecordError("format", f"column {name} has type {column.type} (expected {typ}, non-null)")
        header[name] = column[0].as_py()

    tensors: list[tuple[str, str, list[int], memoryview | None]] = []
    for name in TENSOR_COLUMNS:
        field, column = batch.schema.field(name), batch.column(name)
        if column.type != pa.large_binary():
            raise CorruptRecordError("format", f"column {name} has type {column.type}, expected large_binary")
        if column.null_count:
            if name not in OPTIONAL_TENSORS:
                raise CorruptRecordError("format", f"required tensor {name} is missing")
            tensors.append((name, "", [], None))
            continue
        dtype, shape = _tensor_description(name, field.metadata or {})
        data = _value_bytes(column, view)
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if len(data) != expected:
            raise CorruptRecordError(
                "shape", f"{name}: {len(data)} bytes stored, but {dtype} {shape} needs {expected} bytes"
            )
        tensors.append((name, dtype, shape, data))

    stored = meta.get(b"arcopo.checksum", b"").decode("ascii", "replace")
    actual = _digest(header, tensors, record_module.SCHEMA_VERSION)
    if stored != actual:
        raise CorruptRecordError("checksum", f"checksum mismatch: stored {stored[:30]}..., computed {actual[:30]}...")

    values = {
        name: _to_tensor(data, dtype, shape, writable) for name, dtype, shape, data in tensors if data is not None
    }
    heads = header.pop("reward_heads")
    rewards = values.pop("rewards")
    if rewards.ndim != 2 or rewards.shape[0] != len(heads) or len(set(heads)) != len(heads):
        raise CorruptRecordError("shape", f"rewards {list(rewards.shape)} do not match the heads {heads}")
    values["rewards"] = {h: rewards[i] for i, h in enumerate(heads)}
    values.setdefault("final_latents", None)
    return CandidateGroup(schema_version=record_module.SCHEMA_VERSION, **header, **values)


def _check_schema(schema: pa.Schema) -> None:
    meta = schema.metadata or {}
    if meta.get(b"arcopo.record") != RECORD_TAG:
        raise CorruptRecordError("format", "Arrow file is not a CandidateGroup record (metadata tag missing)")
    version_text = meta.get(b"arcopo.schema_version", b"").decode("ascii", "replace")
    if version_text != str(record_module.SCHEMA_VERSION):
        raise UnsupportedSchemaError(
            "schema_version",
            f"record has schema version {version_text!r}; this code reads version {record_module.SCHEMA_VERSION}",
        )
    expected_names = list(HEADER_COLUMNS) + list(TENSOR_COLUMNS)
    if schema.names != expected_names:
        raise CorruptRecordError("format", f"columns {schema.names} are not {expected_names}")


def _check_declared_size(schema: pa.Schema, max_bytes: int | None) -> None:
    """The tensors' declared shapes must fit the ceiling before a byte of them is read."""
    declared = 0
    for name in TENSOR_COLUMNS:
        metadata = schema.field(name).metadata or {}
        if not metadata:
            continue  # a null value (a required one is refused when the batch is read)
        dtype, shape = _tensor_description(name, metadata)
        declared += math.prod(shape) * ITEMSIZE[dtype]
    if max_bytes is not None and declared > max_bytes:
        raise CorruptRecordError("bounds", f"tensors declare {declared} bytes, above the ceiling of {max_bytes} bytes")


def _uncompressed_batch_message(buf: pa.Buffer) -> pa.ipc.Message:
    """The file's record batch message, refused if its body is compressed.

    The codec never compresses, and a compressed body would be inflated to whatever size its buffer
    headers claim before any check could run (17 KB of zstd can claim 512 MiB), so it is refused
    from the message's metadata (the RecordBatch table's `compression` field, Arrow's Message.fbs),
    without reading the body. An uncompressed body is read in place: its size is the input's."""
    messages = pa.ipc.MessageReader.open_stream(buf.slice(8))  # past the file magic: the stream format
    first, second = messages.read_next_message(), messages.read_next_message()
    if first.type != "schema" or second.type != "record batch":
        raise CorruptRecordError(
            "format", f"messages are {first.type!r}, {second.type!r}; expected a schema, then a record batch"
        )
    meta = second.metadata.to_pybytes()
    root = struct.unpack_from("<I", meta, 0)[0]
    header_field = _table_field(meta, root, 2)
    batch_table = header_field + struct.unpack_from("<I", meta, header_field)[0]
    if _table_field(meta, batch_table, 3):
        raise CorruptRecordError("bounds", "record batch body is compressed; records are written uncompressed")
    return second


def _table_field(flatbuffer: bytes, table: int, field_id: int) -> int:
    """Absolute position of a flatbuffer table's field, 0 when the field is absent."""
    vtable = table - struct.unpack_from("<i", flatbuffer, table)[0]
    vtable_size = struct.unpack_from("<H", flatbuffer, vtable)[0]
    if 4 + 2 * field_id + 2 > vtable_size:
        return 0
    offset = struct.unpack_from("<H", flatbuffer, vtable + 4 + 2 * field_id)[0]
    return table + offset if offset else 0


def _tensor_description(name: str, metadata: dict[bytes, bytes]) -> tuple[str, list[int]]:
    dtype = metadata.get(b"dtype", b"").decode("ascii", "replace")
    if dtype not in DTYPES:
        raise CorruptRecordError("format", f"{name}: unknown dtype tag {dtype!r}")
    try:
        shape = json.loads(metadata.get(b"shape", b""))
    except ValueError:
        raise CorruptRecordError("format", f"{name}: unreadable shape tag") from None
    ok = isinstance(shape, list) and len(shape) <= MAX_DIMS
    if not ok or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape):
        raise CorruptRecordError("format", f"{name}: invalid shape tag {shape!r}")
    return dtype, shape


def _value_bytes(column: pa.Array, view: memoryview) -> memoryview:
    """The bytes of the column's single value, as a slice of the input when Arrow read it in place."""
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[column.offset : column.offset + 2]
    start, end = int(offsets[0]), int(offsets[1])
    base = pa.py_buffer(view).address
    at = data_buf.address + start - base
    if 0 <= at and at + (end - start) <= len(view):
        return view[at : at + end - start]
    return memoryview(data_buf)[start:end]


def _to_tensor(data: memoryview, dtype: str, shape: list[int], writable: bool) -> torch.Tensor:
    if len(data) == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    aligned = np.frombuffer(data, dtype=np.uint8).ctypes.data % ITEMSIZE[dtype] == 0
    if not (writable and aligned and not data.readonly):
        data = memoryview(bytearray(data))  # one copy: tensors never alias read-only memory
    return torch.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)
