"""LoRA adapters: export/import, standard PEFT files, per-adapter merge, scaling, base predictions."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft import PeftModel, get_peft_model_state_dict
from tiny_checkpoints import forward, tiny_inputs, tiny_transformer, transformer_classes

from policy.lora import (
    AdapterStateError,
    attach_adapter,
    disable_adapters,
    export_adapter_state,
    import_adapter_state,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapter,
)

CLASSES = transformer_classes()
RANK, ALPHA = 4, 8.0


def randomize_adapter(model, name, seed):
    """Nonzero A and B (a fresh adapter has B = 0 and changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in export_adapter_state(model, name).items()
    }
    import_adapter_state(model, name, state)
    return state


def model_with_adapter(cls, name="policy", seed=21, base_seed=0):
    model = tiny_transformer(cls, base_seed)
    attach_adapter(model, name, rank=RANK, alpha=ALPHA)
    return model, randomize_adapter(model, name, seed)


def test_default_targets_cover_every_block_linear_and_nothing_else():
    model = tiny_transformer()
    attach_adapter(model, "a")
    state = export_adapter_state(model, "a")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    expected = sorted(
        f"blocks.{i}.{m}"
        for i in range(2)
        for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
    )
    assert modules == expected
    assert state["blocks.0.attn1.to_q.lora_A.weight"].shape == (64, 24)
    # Matches PEFT's own saved names, so the flat dict is PEFT's format minus the file.
    assert sorted(state) == sorted(get_peft_model_state_dict(model, adapter_name="a"))
    # A fresh adapter leaves the output unchanged; base weights are frozen, the adapter trainable.
    assert torch.equal(forward(model, tiny_inputs()), forward(tiny_transformer(), tiny_inputs()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("cls", CLASSES)
def test_export_import_gives_identical_outputs_under_another_name(cls):
    source, _ = model_with_adapter(cls, "policy")
    inputs = tiny_inputs()
    out = forward(source, inputs)
    assert (out - forward(tiny_transformer(cls), inputs)).abs().max() > 1e-3  # the adapter matters

    state = export_adapter_state(source, "policy")
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    target = tiny_transformer(cls)
    attach_adapter(target, "v7", rank=RANK, alpha=ALPHA)
    import_adapter_state(target, "v7", state)
    assert torch.equal(forward(target, inputs), out)
    state["blocks.0.attn1.to_q.lora_A.weight"].add_(1.0)  # an export is a copy, not a view
    assert torch.equal(forward(source, inputs), out)


def test_import_rejects_wrong_keys_and_shapes_without_changing_anything():
    model, _ = model_with_adapter(WanTransformer3DModel, "a")
    before = export_adapter_state(model, "a")
    bad = dict(before)
    del bad["blocks.1.ffn.net.2.lora_B.weight"]
    bad["blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(RANK + 1, 24)
    bad["blocks.0.proj.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(AdapterStateError) as info:
        import_adapter_state(model, "a", bad)
    message = str(info.value)
    assert "1 missing: blocks.1.ffn.net.2.lora_B.weight" in message
    assert "1 unexpected: blocks.0.proj.lora_A.weight" in message
    assert "blocks.0.attn1.to_q.lora_A.weight: given (5, 24) vs adapter (4, 24)" in message
    after = export_adapter_state(model, "a")
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        export_adapter_state(model, "b")


@pytest.mark.parametrize("cls", CLASSES)
def test_saved_adapter_loads_in_peft_diffusers_and_back(tmp_path, cls):
    source, _ = model_with_adapter(cls, "policy")
    inputs = tiny_inputs()
    expected = forward(source, inputs)
    directory = save_adapter(source, "policy", tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, ALPHA)

    peft_model = PeftModel.from_pretrained(tiny_transformer(cls), str(directory))
    assert (forward(peft_model.get_base_model(), inputs) - expected).abs().max() < 1e-6

    via_diffusers = tiny_transformer(cls)
    via_diffusers.load_lora_adapter(
        str(directory), weight_name="adapter_model.safetensors", prefix="base_model.model", adapter_name="x"
    )
    assert via_diffusers.peft_config["x"].lora_alpha == ALPHA  # alpha != rank survives the round trip
    assert (forward(via_diffusers, inputs) - expected).abs().max() < 1e-6

    ours = load_adapter(tiny_transformer(cls), directory, "restored")
    assert torch.equal(forward(ours, inputs), expected)


def test_lora_scaling_is_alpha_over_rank():
    model, state = model_with_adapter(WanTransformer3DModel, "a")
    layer = model.blocks[0].attn1.to_q
    x = torch.randn(3, 24)
    a, b = state["blocks.0.attn1.to_q.lora_A.weight"], state["blocks.0.attn1.to_q.lora_B.weight"]
    base = layer.get_base_layer()
    expected = x @ base.weight.T + base.bias + (ALPHA / RANK) * (x @ a.T @ b.T)
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() < 1e-6


@pytest.mark.parametrize("cls", CLASSES)
def test_merge_scales(cls):
    model, state_a = model_with_adapter(cls, "semi", seed=31)
    attach_adapter(model, "on", rank=2, alpha=6.0)
    state_on = randomize_adapter(model, "on", seed=32)
    base = tiny_transformer(cls)
    inputs = tiny_inputs()

    zero = merge_adapters(model, {"semi": 0.0, "on": 0.0})
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in zero.state_dict().items())
    assert not any(".lora_" in k or "base_layer" in k for k in zero.state_dict())

    merged = merge_adapters(model, {"semi": 1.0, "on": 0.4})
    # Independent: W + sum_i s_i * alpha_i / r_i * B_i @ A_i from the exported tensors.
    for module in ("blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj", "blocks.1.attn2.to_out.0"):
        expected = base.state_dict()[f"{module}.weight"].double()
        for state, scale, alpha, rank in ((state_a, 1.0, ALPHA, RANK), (state_on, 0.4, 6.0, 2)):
            expected = expected + scale * alpha / rank * (
                state[f"{module}.lora_B.weight"].double() @ state[f"{module}.lora_A.weight"].double()
            )
        assert (merged.state_dict()[f"{module}.weight"].double() - expected).abs().max() < 1e-6
    # ... and the same function as PEFT running both adapters with those weights, unmerged.
    model.set_adapters(["semi", "on"], weights=[1.0, 0.4])
    assert (forward(merged, inputs) - forward(model, inputs)).abs().max() < 1e-5
    assert isinstance(merged, cls) and "semi" in model.peft_config  # the source keeps its adapters


def test_disable_adapters_gives_base_predictions_and_restores_state():
    model, _ = model_with_adapter(WanTransformer3DModel, "a")
    attach_adapter(model, "b", rank=RANK, alpha=ALPHA)
    randomize_adapter(model, "b", seed=5)
    set_active_adapter(model, "a")
    inputs = tiny_inputs()
    with_a = forward(model, inputs)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with disable_adapters(model):
        assert torch.equal(forward(model, inputs), forward(tiny_transformer(), inputs))
    assert torch.equal(forward(model, inputs), with_a)
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(g for n, g in grads.items() if ".lora_A.a." in n) and not any(
        g for n, g in grads.items() if ".lora_A.b." in n
    )
    set_active_adapter(model, "b")
    assert not torch.equal(forward(model, inputs), with_a)
