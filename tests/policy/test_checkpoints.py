"""Released checkpoints, written in each upstream's on-disk layout, load into the diffusers-named model."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file
from tiny_checkpoints import (
    LINEARS_PER_BLOCK,
    TINY_WAN_CONFIG,
    forward,
    forward_block_causal,
    random_block_lora,
    save_causal_forcing,
    save_longlive,
    save_self_forcing,
    tiny_inputs,
    tiny_transformer,
    to_original_wan_names,
    transformer_classes,
)

from policy.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    load_transformer_checkpoint,
    read_transformer_state,
)
from policy.transformer_causal_wan import CausalWanTransformer3DModel

CLASSES = transformer_classes()


def assert_same_model(loaded, source):
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = tiny_inputs()
    assert torch.equal(forward(loaded, inputs), forward(source, inputs))
    if isinstance(loaded, CausalWanTransformer3DModel):
        assert torch.equal(forward_block_causal(loaded, inputs), forward_block_causal(source, inputs))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("prefix", ["model.", "model._fsdp_wrapped_module."])
def test_self_forcing_uses_generator_ema(tmp_path, cls, prefix):
    generator, ema, critic = tiny_transformer(cls, 1), tiny_transformer(cls, 2), tiny_transformer(cls, 3)
    path = save_self_forcing(tmp_path / "self_forcing_dmd.pt", generator, ema, critic, prefix=prefix)
    loaded = load_transformer_checkpoint(path, tiny_transformer(cls, 9), "self_forcing")
    assert_same_model(loaded, ema)
    assert not torch.equal(forward(loaded, tiny_inputs()), forward(generator, tiny_inputs()))


@pytest.mark.parametrize("cls", CLASSES)
def test_self_forcing_falls_back_to_generator(tmp_path, cls):
    generator = tiny_transformer(cls, 4)
    path = save_self_forcing(tmp_path / "ode_init.pt", generator, generator_ema=None, critic=tiny_transformer(cls, 5))
    assert_same_model(load_transformer_checkpoint(path, tiny_transformer(cls, 9), "self_forcing"), generator)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("variant", ["chunkwise", "framewise"])
def test_causal_forcing_variants(tmp_path, cls, variant):
    model = tiny_transformer(cls, 6)
    path = save_causal_forcing(tmp_path / "causal_forcing.pt", model, variant)
    assert_same_model(load_transformer_checkpoint(path, tiny_transformer(cls, 9), "causal_forcing"), model)


@pytest.mark.parametrize("cls", CLASSES)
def test_longlive_base_with_lora_merged_equals_peft_applied_lora(tmp_path, cls):
    base = tiny_transformer(cls, 7)
    rank, alpha = 4, 256.0
    lora = random_block_lora(base, rank, seed=8)
    directory = save_longlive(tmp_path / "models", base, lora)
    loaded = load_transformer_checkpoint(directory, tiny_transformer(cls, 9), "longlive")

    # Independent reference: PEFT's own LoRA layers, unmerged, on a copy of the base.
    reference = tiny_transformer(cls, 7)
    targets = [f"blocks.{i}.{linear}" for i in range(len(base.blocks)) for linear in LINEARS_PER_BLOCK]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), reference, "ll")
    result = set_peft_model_state_dict(reference, lora, adapter_name="ll")
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    inputs = tiny_inputs()
    expected = forward(reference, inputs)
    assert (forward(loaded, inputs) - expected).abs().max().item() < 1e-4
    # The LoRA matters here: base alone is far from it.
    assert (forward(base, inputs) - expected).abs().max().item() > 1e-2
    if cls is CausalWanTransformer3DModel:
        difference = forward_block_causal(loaded, inputs) - forward_block_causal(reference, inputs)
        assert difference.abs().max().item() < 1e-4

    # Same files, explicit paths.
    again = load_transformer_checkpoint(
        directory / "longlive_base.pt", tiny_transformer(cls, 9), "longlive", lora_path=directory / "lora.pt"
    )
    assert torch.equal(forward(again, inputs), forward(loaded, inputs))


@pytest.mark.parametrize("cls", CLASSES)
def test_diffusers_directory_and_original_safetensors(tmp_path, cls):
    model = tiny_transformer(cls, 10)
    model.save_pretrained(tmp_path / "diffusers")
    assert_same_model(load_transformer_checkpoint(tmp_path / "diffusers", tiny_transformer(cls, 9), "diffusers"), model)
    original = {k: v.contiguous() for k, v in to_original_wan_names(model.state_dict()).items()}
    save_file(original, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = load_transformer_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors", tiny_transformer(cls, 9), "diffusers")
    assert_same_model(loaded, model)


def _corrupt(tmp_path, edit):
    checkpoint = torch.load(save_self_forcing(tmp_path / "sf.pt", tiny_transformer(seed=11)), weights_only=True)
    edit(checkpoint["generator"])
    torch.save(checkpoint, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


def test_missing_extra_and_misshapen_keys_are_listed(tmp_path):
    def edit(state):
        del state["model.blocks.1.cross_attn.k.weight"]
        state["model.blocks.0.self_attn.extra.weight"] = torch.zeros(3)
        state["model.head.head.weight"] = torch.zeros(5, 5)

    path = _corrupt(tmp_path, edit)
    target = tiny_transformer(seed=9)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_transformer_checkpoint(path, target, "self_forcing")
    message = str(info.value)
    assert info.value.missing == ["blocks.1.attn2.to_k.weight"]
    assert info.value.unexpected == ["blocks.0.attn1.extra.weight"]
    assert len(info.value.shape_mismatches) == 1 and info.value.shape_mismatches[0].startswith("proj_out.weight")
    for name in ("blocks.1.attn2.to_k.weight", "blocks.0.attn1.extra.weight", "proj_out.weight: checkpoint (5, 5)"):
        assert name in message
    # Nothing was written into the model.
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_wrong_kind_and_wrong_model_size_are_named(tmp_path):
    path = save_causal_forcing(tmp_path / "cf.pt", tiny_transformer(seed=12), "chunkwise")
    torch.save({"optimizer": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"none of the entries \['generator_ema', 'generator'\].*optimizer"):
        read_transformer_state(tmp_path / "other.pt", "self_forcing")
    bigger = WanTransformer3DModel(**{**TINY_WAN_CONFIG, "num_layers": 3})
    with pytest.raises(CheckpointMismatchError, match="missing keys: blocks.2."):
        load_transformer_checkpoint(path, bigger, "causal_forcing")
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        read_transformer_state(path, "wan3")


def test_longlive_lora_mismatch_and_missing_file(tmp_path):
    base = tiny_transformer(seed=13)
    lora = random_block_lora(base, 2, seed=14)
    lora["blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(2, 7)
    del lora["blocks.1.ffn.net.2.lora_B.weight"]
    directory = save_longlive(tmp_path / "ll", base, lora)
    with pytest.raises(CheckpointMismatchError) as info:
        read_transformer_state(directory, "longlive")
    assert info.value.missing == ["blocks.1.ffn.net.2.lora_B.weight"]
    assert info.value.shape_mismatches[0].startswith("blocks.0.attn1.to_q: A(2, 7)")
    (directory / "lora.pt").unlink()
    with pytest.raises(FileNotFoundError, match="lora.pt"):
        read_transformer_state(directory / "longlive_base.pt", "longlive")


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"generator": {"model.x": _NotATensor()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not unpickled"):
        read_transformer_state(tmp_path / "evil.pt", "self_forcing")


def test_conversion_covers_the_full_size_wan_1_3b_keys():
    """The real architecture's original key set converts onto the model's (shapes only, meta tensors)."""
    from policy.checkpoints import check_state_matches, strip_wrapper_prefixes, wan_to_diffusers
    from policy.presets import WAN21_T2V_1_3B

    with torch.device("meta"):
        model = CausalWanTransformer3DModel(**WAN21_T2V_1_3B)
    original = {"model._fsdp_wrapped_module." + k: v for k, v in to_original_wan_names(model.state_dict()).items()}
    assert "model._fsdp_wrapped_module.blocks.29.norm3.weight" in original and len(original) == 825
    check_state_matches(model, wan_to_diffusers(strip_wrapper_prefixes(original)), "full-size key set")
