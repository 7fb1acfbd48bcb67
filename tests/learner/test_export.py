"""`learner.export`: the adapter in diffusers' pipeline LoRA format, loaded by a tiny WanPipeline, and
the merged transformer in diffusers' layout."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from controller.config import dump_config, load_config
from controller.export import ExportError, export_pipeline_lora, main
from policy.lora import attach_adapter, export_adapter_state, import_adapter_state, save_adapter
from policy.presets import build_policy

RANK, ALPHA = 4, 8.0


@pytest.fixture
def trained(tmp_path):
    """A run of the project's tiny model: its config.yaml and a checkpoint whose adapter looks trained
    (random A and B)."""
    transformer = build_policy("tiny").transformer.eval()
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    attach_adapter(transformer, "on_policy", rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(7)
    import_adapter_state(transformer, "on_policy", {
        k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in export_adapter_state(transformer, "on_policy").items()
    })
    checkpoint = tmp_path / "run" / "checkpoints" / "iter_000004"
    save_adapter(transformer, "on_policy", checkpoint / "adapter")
    (checkpoint / "state.json").write_text(json.dumps({"iteration": 4, "adapter": "on_policy"}))
    (checkpoint.parent / "latest").write_text(checkpoint.name)
    (checkpoint.parent.parent / "config.yaml").write_text(dump_config(load_config(None, ["policy.preset=tiny", "policy.device=cpu"])))
    return transformer, base, checkpoint


def _inputs(config, frames=3):
    generator = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, config.in_channels, frames, 8, 8, generator=generator),
                timestep=torch.tensor([640.0]),
                encoder_hidden_states=torch.randn(1, 5, config.text_dim, generator=generator))


@torch.no_grad()
def _project_output(transformer, inputs):
    """The project's own path: the whole clip as one chunk of its block-causal forward."""
    latents = inputs["hidden_states"].permute(0, 2, 1, 3, 4)
    out = transformer.forward_dense(latents, inputs["timestep"], inputs["encoder_hidden_states"],
                                    frames_per_chunk=latents.shape[1])
    return out.permute(0, 2, 1, 3, 4)


def _tiny_pipeline(transformer_config, base_state):
    transformer = WanTransformer3DModel.from_config(transformer_config)
    transformer.load_state_dict(base_state)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=transformer_config.text_dim, d_kv=4,
                                               d_ff=24, num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=8, z_dim=transformer_config.in_channels, dim_mult=[1, 1], num_res_blocks=1,
                           temperal_downsample=[False])
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), transformer=transformer.eval(),
                       vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler())


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_exported_adapter_loads_in_a_wan_pipeline_and_gives_the_projects_output(trained, tmp_path):
    transformer, base, checkpoint = trained
    out = tmp_path / "export"
    weights = export_pipeline_lora(checkpoint.parent.parent, out)  # the run directory: its newest checkpoint
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.blocks.") and ".lora_" in k for k in keys)
    assert len(keys) == len(export_adapter_state(transformer, "on_policy"))

    pipe = _tiny_pipeline(transformer.config, base)
    inputs = _inputs(transformer.config)
    with torch.no_grad():
        before = pipe.transformer(**inputs, return_dict=False)[0]
    collect = _Collect()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(collect)
    try:
        pipe.load_lora_weights(str(out), adapter_name="arcopo")
    finally:
        diffusers_logger.removeHandler(collect)
    assert not [m for m in collect.messages if "No LoRA keys" in m or "unexpected" in m.lower()], collect.messages
    assert pipe.transformer.peft_config["arcopo"].lora_alpha == ALPHA and pipe.transformer.peft_config["arcopo"].r == RANK

    with torch.no_grad():
        after = pipe.transformer(**inputs, return_dict=False)[0]
    expected = _project_output(transformer, inputs)
    assert (after - before).abs().max() > 1e-2  # the adapter changed the pipeline's transformer
    assert (after - expected).abs().max() < 1e-5


def test_merge_scale_saves_a_diffusers_transformer_with_the_scaled_adapter(trained, tmp_path):
    """The base weights come from the run's config.yaml (the tiny preset), found beside the checkpoints."""
    transformer, base, checkpoint = trained
    scale = 0.5
    out = tmp_path / "export"
    assert main(["--checkpoint", str(checkpoint), "--output", str(out), "--merge-scale", str(scale)]) == 0
    merged = WanTransformer3DModel.from_pretrained(out / "transformer").eval()
    assert type(merged) is WanTransformer3DModel and (out / "pytorch_lora_weights.safetensors").is_file()

    # Independent: base weight + scale * alpha / rank * B @ A on every adapted Linear.
    lora = export_adapter_state(transformer, "on_policy")
    state = merged.state_dict()
    for key, weight in base.items():
        module = key.removesuffix(".weight")
        if f"{module}.lora_A.weight" in lora:
            delta = scale * ALPHA / RANK * lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]
            torch.testing.assert_close(state[key], weight + delta, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(state[key], weight), key


def test_export_names_a_directory_that_holds_no_adapter(tmp_path, capsys):
    with pytest.raises(ExportError, match="neither"):
        export_pipeline_lora(tmp_path, tmp_path / "out")
    assert main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "PEFT adapter directory" in capsys.readouterr().err
