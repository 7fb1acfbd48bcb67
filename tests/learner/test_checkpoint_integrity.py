"""Checkpoint integrity: the manifest's digests, finite weights and optimiser state, and a validated
state.json, checked on every restore; a damaged checkpoint changes nothing in the model."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint_fixtures import ADAPTER, adapted_transformer, flip_tensor_byte, rewrite_state, write_checkpoint
from learner.checkpoint import CheckpointDamaged, load_learner_checkpoint, verify_checkpoint
from learner.checkpoint_manifest import MANIFEST, sha256_file, write_manifest


def _lora(transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}


def _restore(path):
    transformer = adapted_transformer()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = _lora(transformer)
    try:
        return load_learner_checkpoint(path, transformer, ADAPTER, optimizer), _lora(transformer), optimizer
    except CheckpointDamaged:
        assert all(torch.equal(before[k], v) for k, v in _lora(transformer).items()), "a refused checkpoint changed the model"
        raise


def test_an_intact_checkpoint_restores_weights_optimizer_and_state(tmp_path):
    path, saved = write_checkpoint(tmp_path, 3)
    manifest = json.loads((path / MANIFEST).read_text())["files"]
    assert set(manifest) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt", "state.json"}
    assert manifest["optimizer.pt"]["sha256"] == sha256_file(path / "optimizer.pt")
    state, restored, optimizer = _restore(path)
    assert state["iteration"] == 3 and state["policy_version"] == 3 and state["run_tag"] == "run"
    assert set(restored) == set(saved) and all(torch.equal(restored[k], saved[k]) for k in saved)
    assert all(s["step"].item() == 3 for s in optimizer.state_dict()["state"].values())


def test_flipped_bytes_inside_the_adapter_tensor_data_are_refused(tmp_path):
    path, _ = write_checkpoint(tmp_path, 2)
    flip_tensor_byte(path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(CheckpointDamaged, match=r"adapter/adapter_model\.safetensors does not match its SHA-256"):
        _restore(path)


@pytest.mark.parametrize("damage", ["optimizer.pt", "state.json"])
def test_any_changed_file_is_refused(tmp_path, damage):
    path, _ = write_checkpoint(tmp_path, 2)
    data = bytearray((path / damage).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / damage).write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match=f"{damage} does not match its SHA-256"):
        verify_checkpoint(path, ADAPTER)


def test_a_missing_file_or_manifest_is_refused(tmp_path):
    path, _ = write_checkpoint(tmp_path, 2)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointDamaged, match="optimizer.pt is missing"):
        verify_checkpoint(path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointDamaged, match="manifest.json is missing"):
        _restore(path)


def test_nan_weights_are_refused_even_with_a_matching_manifest(tmp_path):
    path, _ = write_checkpoint(tmp_path, 2, nan_weight=True)
    with pytest.raises(CheckpointDamaged, match=r"adapter/adapter_model\.safetensors holds NaN or infinite values in 1 tensor"):
        _restore(path)


def test_non_finite_optimizer_moments_are_refused(tmp_path):
    path, _ = write_checkpoint(tmp_path, 2)
    state = torch.load(path / "optimizer.pt", weights_only=True)
    first = next(iter(state["state"]))
    state["state"][first]["exp_avg_sq"][0] = float("inf")
    torch.save(state, path / "optimizer.pt")
    rewrite_state(path, {})  # re-digests: the writer itself saved the bad moments
    with pytest.raises(CheckpointDamaged, match=rf"optimizer\.pt holds NaN or infinite values .*state\.{first}\.exp_avg_sq"):
        _restore(path)


@pytest.mark.parametrize(
    "update, drop, field",
    [
        ({}, ("policy_version",), "field policy_version: Field required"),
        ({"iteration": -1}, (), "field iteration: Input should be greater than or equal to 0"),
        ({"iteration": "7"}, (), "field iteration: Input should be a valid integer"),
        ({"applied_group_ids": [1, 2]}, (), r"field applied_group_ids\.0: Input should be a valid string"),
        ({"anchor_rng": [300]}, (), r"field anchor_rng\.0: Input should be less than or equal to 255"),
        ({"unacked": [{"group_id": "g"}]}, (), r"field unacked\.0: Field required"),
    ],
)
def test_a_broken_state_json_names_the_file_and_the_field(tmp_path, update, drop, field):
    path, _ = write_checkpoint(tmp_path, 2)
    rewrite_state(path, update, drop)
    with pytest.raises(CheckpointDamaged, match=rf"{path.name}/state\.json: {field}"):
        _restore(path)


def test_state_json_that_is_not_json_names_the_file(tmp_path):
    path, _ = write_checkpoint(tmp_path, 2)
    (path / "state.json").write_text('{"iteration": 2, "adap')
    write_manifest(path)
    with pytest.raises(CheckpointDamaged, match=r"state\.json is not valid JSON"):
        verify_checkpoint(path)


def test_a_checkpoint_of_another_adapter_or_rank_is_refused(tmp_path):
    path, _ = write_checkpoint(tmp_path, 2)
    with pytest.raises(ValueError, match="holds adapter 'on_policy', this run trains 'semi_on_policy'"):
        verify_checkpoint(path, "semi_on_policy")
    with pytest.raises(ValueError, match="rank 4, this run's lora.rank is 16"):
        verify_checkpoint(path, ADAPTER, lora_rank=16)
    assert verify_checkpoint(path, ADAPTER, lora_rank=4).iteration == 2
