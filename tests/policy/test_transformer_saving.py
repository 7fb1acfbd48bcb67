"""The causal transformer saves and loads in diffusers' standard layout, as WanTransformer3DModel does."""

import torch
from diffusers import WanTransformer3DModel

from policy.presets import build_policy
from policy.transformer_causal_wan import CausalWanTransformer3DModel


def test_save_pretrained_round_trips_through_both_classes(tmp_path):
    original = build_policy("tiny", seed=3).transformer
    original.save_pretrained(tmp_path)
    for cls in (CausalWanTransformer3DModel, WanTransformer3DModel):
        loaded = cls.from_pretrained(tmp_path)
        assert type(loaded) is cls and loaded.config.num_layers == original.config.num_layers
        for (name, a), b in zip(original.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
