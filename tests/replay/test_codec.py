"""The record's validation and the Arrow codec: exact round trips, and every kind of bad bytes rejected."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from replay import record as record_module
from replay.codec import CorruptRecordError, UnsupportedSchemaError, decode, encode
from replay.record import CandidateGroup
from replay_testing import assert_same_group, group


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pivot,with_final", [(0, False), (2, True)])
def test_round_trip_every_field(dtype, pivot, with_final):
    g = group(3, dtype=dtype, pivot=pivot, with_final=with_final)
    payload = encode(g)
    for source in (payload, bytes(payload), memoryview(payload)):
        assert_same_group(decode(source), g)
    if pivot == 0:
        assert decode(payload).prefix_latents.shape == (0, 4, 8, 8)


def test_round_trip_without_reward_heads_and_with_large_seed():
    g = group(1, heads=()).model_copy(update={"noise_seed": 2**64 - 1})
    assert_same_group(decode(encode(g)), g)


def test_payload_is_a_plain_arrow_file_with_dtype_and_shape_tags():
    g = group(0, dtype=torch.bfloat16)
    table = pa.ipc.open_file(pa.py_buffer(bytes(encode(g)))).read_all()
    field = table.schema.field("pivot_inputs")
    assert field.metadata[b"dtype"] == b"bfloat16"
    assert field.metadata[b"shape"] == b"[4, 4, 2, 4, 8, 8]"
    raw = table.column("pivot_inputs")[0].as_py()
    assert raw == g.pivot_inputs.view(torch.int16).numpy().tobytes()  # bf16 stored as its raw 2 bytes
    assert table.column("group_id")[0].as_py() == g.group_id


def test_writable_input_is_decoded_without_copies_and_bytes_input_is_copied():
    payload = encode(group(0))
    base = np.frombuffer(payload, dtype=np.uint8).ctypes.data
    zero_copy = decode(payload).pivot_x0
    assert base <= zero_copy.data_ptr() < base + len(payload)
    copied = decode(bytes(payload)).pivot_x0
    assert not (base <= copied.data_ptr() < base + len(payload))
    copied.add_(1.0)  # a decoded tensor is an ordinary writable tensor
    assert_same_group(decode(payload), group(0))


def test_header_disagreeing_with_tensors_is_rejected_with_a_clear_message():
    good = group(0)
    with pytest.raises(ValidationError, match="pivot_x0"):
        CandidateGroup(**{**dict(good), "pivot_x0": good.pivot_x0[:, :2]})
    with pytest.raises(ValidationError, match="prefix_latents"):
        CandidateGroup(**{**dict(good), "pivot": 2})
    with pytest.raises(ValidationError, match="G=5"):
        CandidateGroup(**{**dict(good), "group_size": 5})
    with pytest.raises(ValidationError, match="final_latents"):
        CandidateGroup(**{**dict(good), "final_latents": torch.zeros(4, 3, 4, 8, 8)})
    with pytest.raises(ValidationError, match="int64"):
        CandidateGroup(**{**dict(good), "pivot_inputs": good.pivot_inputs.long()})
    with pytest.raises(ValidationError, match="pivot 4 must be < num_chunks 4"):
        CandidateGroup(**{**dict(good), "pivot": 4})


def test_numpy_arrays_are_accepted_and_come_out_as_torch_tensors():
    good = group(0)
    fields = {**dict(good), "pivot_x0": good.pivot_x0.numpy(), "rewards": {"VQ": np.arange(4.0)}}
    g = CandidateGroup(**fields)
    assert isinstance(g.pivot_x0, torch.Tensor) and g.rewards["VQ"].dtype == torch.float64


def test_docstring_size_of_a_real_480p_bf16_group():
    """The module docstring's 59,304,960 tensor bytes (pivot 3, no final latents), checked by encoding."""
    G, T, f, chw = 12, 4, 3, (16, 60, 104)
    g = CandidateGroup(
        group_id="real", prompt="p", prompt_key="k", adapter_name="a", policy_version=0, pivot=3, num_chunks=7,
        group_size=G, sigma=0.5, noise_seed=1, exploration="initial_noise",
        prefix_latents=torch.zeros(3 * f, *chw, dtype=torch.bfloat16), timesteps=torch.zeros(T),
        pivot_inputs=torch.zeros(G, T, f, *chw, dtype=torch.bfloat16),
        pivot_x0=torch.zeros(G, T, f, *chw, dtype=torch.bfloat16),
        rewards={"VQ": torch.zeros(G), "MQ": torch.zeros(G), "TA": torch.zeros(G)},
        reward_valid=torch.ones(G, dtype=torch.bool),
    )
    latent_bytes = (3 * f + 2 * G * T * f) * 16 * 60 * 104 * 2
    assert latent_bytes == 59_304_960
    size = len(encode(g))
    assert latent_bytes < size < latent_bytes + 10_000


def test_every_bit_flip_is_rejected_or_harmless():
    payload = encode(group(0))
    rng = random.Random(0)
    rejected = 0
    for _ in range(200):
        damaged = bytearray(payload)
        position = rng.randrange(len(damaged))
        damaged[position] ^= 1 << rng.randrange(8)
        try:
            assert_same_group(decode(damaged), group(0))  # a flip in padding changes nothing
        except CorruptRecordError:
            rejected += 1
    assert rejected > 150


def test_truncated_and_garbage_payloads_raise_corrupt_record_error():
    payload = bytes(encode(group(0)))
    for n in list(range(0, 64)) + list(range(64, len(payload), 997)) + [len(payload) - 1]:
        with pytest.raises(CorruptRecordError):
            decode(payload[:n])
    rng = np.random.default_rng(0)
    for size in (1, 100, 10_000):
        with pytest.raises(CorruptRecordError):
            decode(rng.bytes(size))
    with pytest.raises(CorruptRecordError):
        decode(b"ARROW1\x00\x00" + rng.bytes(500) + b"ARROW1")
    with pytest.raises(CorruptRecordError, match="bytes-like"):
        decode("not bytes")  # type: ignore[arg-type]


def test_flipped_tensor_byte_fails_the_checksum():
    g = group(0)
    payload = encode(g)
    marker = g.pivot_x0.numpy().tobytes()[:64]
    at = bytes(payload).index(marker)
    payload[at + 5] ^= 0x10
    with pytest.raises(CorruptRecordError, match="checksum") as info:
        decode(payload)
    assert info.value.reason == "checksum"


def test_wrong_schema_version_is_rejected(monkeypatch):
    g = group(0)
    monkeypatch.setattr(record_module, "SCHEMA_VERSION", 99)
    future = encode(g)
    monkeypatch.undo()
    with pytest.raises(UnsupportedSchemaError, match="schema version '99'"):
        decode(future)


def test_wrong_shape_written_by_a_buggy_producer_is_rejected():
    good = group(0)
    bad = CandidateGroup.model_construct(**{**dict(good), "pivot_x0": good.pivot_x0[:3]})  # skips validation
    with pytest.raises(CorruptRecordError, match="pivot_x0") as info:
        decode(encode(bad))
    assert info.value.reason == "shape"
