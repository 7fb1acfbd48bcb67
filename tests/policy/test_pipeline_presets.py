"""Policy container, text-conditioning cache and presets."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from policy.pipeline import StreamingVideoPolicy, TextEncoder, prompt_key
from policy.presets import PolicyPreset, build_policy, get_preset, list_presets
from policy.transformer_causal_wan import CausalWanTransformer3DModel
from tests.policy.conftest import ToyTextEncoder, make_policy


def test_text_conditioning_is_encoded_once_per_prompt_key():
    policy = make_policy("tiny")
    encoder = policy.text_encoder
    assert isinstance(encoder, TextEncoder)
    first = policy.text_conditioning(["a cat", "a dog", "a cat"])
    assert first.shape == (3, encoder.seq_len, 32) and encoder.calls == 1
    assert torch.equal(first[0], first[2]) and not torch.equal(first[0], first[1])
    assert first[0, 2:].abs().sum() == 0  # zero past the prompt's two tokens
    again = policy.text_conditioning(["a dog"])
    assert encoder.calls == 1 and torch.equal(again[0], first[1])
    expected = hashlib.sha256(f"{encoder.encoder_id}\x00a dog".encode()).hexdigest()[:32]
    assert policy.prompt_key("a dog") == expected != prompt_key("a dog", "another-encoder")


def test_text_cache_is_bounded():
    policy = make_policy("tiny")
    policy.max_cached_prompts = 2
    policy.text_conditioning(["one", "two", "three"])
    assert len(policy._text_cache) == 2 and policy.prompt_key("one") not in policy._text_cache


def test_real_presets_have_the_wan21_1_3b_geometry():
    preset = get_preset("self-forcing-1.3b")
    with torch.device("meta"):
        model = CausalWanTransformer3DModel(**preset.transformer)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["blocks.29.attn1.to_q.weight"] == (1536, 1536) and "blocks.30.norm2.weight" not in shapes
    assert shapes["blocks.0.ffn.net.0.proj.weight"] == (8960, 1536)
    assert shapes["condition_embedder.text_embedder.linear_1.weight"] == (1536, 4096)
    assert shapes["patch_embedding.weight"] == (1536, 16, 1, 2, 2)
    assert preset.sampler.warped_timesteps()[1] == 937.5
    assert preset.frames_per_chunk * preset.num_chunks == 21 and preset.latent_shape == (16, 60, 104)
    longlive = get_preset("longlive-1.3b")
    assert (longlive.local_window, longlive.sink_frames) == (12, 3)
    assert get_preset("causal-forcing-framewise-1.3b").frames_per_chunk == 1


def test_real_preset_without_paths_names_the_missing_field():
    with pytest.raises(ValueError, match="checkpoint_path"):
        build_policy("self-forcing-1.3b")
    with pytest.raises(ValueError, match="vae_path"):
        build_policy(get_preset("longlive-1.3b").with_paths(checkpoint_path="x.pt", text_encoder_path="t5"))


def test_build_from_a_diffusers_checkpoint(tmp_path):
    source = make_policy("tiny", seed=3).transformer
    source.save_pretrained(tmp_path / "transformer")
    preset = get_preset("tiny").model_copy(
        update={"name": "tiny-loaded", "checkpoint_kind": "diffusers", "checkpoint_path": str(tmp_path / "transformer")}
    )
    loaded = build_policy(preset, text_encoder=ToyTextEncoder(), codec=object(), seed=0)
    fresh = make_policy("tiny", seed=0).transformer
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[name], tensor), name
    assert not torch.equal(fresh.proj_out.weight, source.proj_out.weight)


def test_lazy_preset_module_registers_on_first_request(tmp_path, monkeypatch):
    import policy.presets as presets

    (tmp_path / "lazy_preset_mod.py").write_text(
        "from policy.presets import get_preset, register_preset\n"
        "register_preset(get_preset('tiny').model_copy(update={'name': 'lazy-one'}))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(presets._LAZY_MODULES, "lazy-one", "lazy_preset_mod")
    monkeypatch.delitem(presets._REGISTRY, "lazy-one", raising=False)
    assert "lazy-one" in list_presets() and "lazy_preset_mod" not in sys.modules
    assert get_preset("lazy-one").frames_per_chunk == 3
    monkeypatch.delitem(presets._REGISTRY, "lazy-one")
    monkeypatch.delitem(sys.modules, "lazy_preset_mod")
    assert "pocket" in list_presets()
    with pytest.raises(KeyError, match="unknown policy preset 'nope'"):
        get_preset("nope")


def test_policy_validates_its_geometry():
    model = make_policy("tiny").transformer
    with pytest.raises(ValueError, match="local_window"):
        StreamingVideoPolicy(model, get_preset("tiny").sampler, 3, 4, (4, 8, 8), local_window=4, sink_frames=2)
    with pytest.raises(ValueError, match="in_channels"):
        StreamingVideoPolicy(model, get_preset("tiny").sampler, 3, 4, (8, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        StreamingVideoPolicy(model, get_preset("tiny").sampler, 3, 4, (4, 7, 8))
    with pytest.raises(ValueError):
        PolicyPreset(name="x", transformer={}, frames_per_chunk=0, num_chunks=1, latent_shape=(4, 8, 8))
