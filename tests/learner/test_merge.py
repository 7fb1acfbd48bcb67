"""learner.merge: the merge sweep, the paper's selection rule, the written table and weights."""

from __future__ import annotations

import json

import pytest
import torch

from controller.config import load_config
from controller.evaluation import EvalSummary
from controller.merge import adapter_dir, merge_sweep, select_scale
from policy.factory import add_adapter, build_configured_policy
from policy.lora import adapter_delta, load_adapter, save_adapter
from diffusers import WanTransformer3DModel


def _summary(reward, ood):
    return EvalSummary({"TA": reward}, reward, ood, 0)


def test_selection_is_the_largest_scale_improving_both():
    base = _summary(1.0, 5.0)
    merged = {0.0: _summary(0.9, 4.0), 0.4: _summary(1.1, 4.5), 0.8: _summary(1.3, 4.9), 1.0: _summary(1.5, 5.2)}
    assert select_scale(base, merged) == 0.8  # 1.0 has the best reward but degrades the OOD metric
    assert select_scale(base, {1.0: _summary(0.5, 1.0)}) is None
    no_ood = {0.5: EvalSummary({}, 1.2, None, 0), 1.0: EvalSummary({}, 1.4, None, 0)}
    assert select_scale(EvalSummary({}, 1.0, None, 0), no_ood) == 1.0


def test_merge_sweep_writes_the_table_and_the_merged_weights(untrained_pocket_weights, tmp_path, monkeypatch):
    config = load_config(None, [f"policy.transformer_checkpoint={untrained_pocket_weights}", "run.eval_prompts_limit=2",
                                "lora.rank=2", "lora.alpha=4"])
    dirs = {}
    for name, seed in (("semi", 1), ("on", 2)):
        policy = build_configured_policy(config.policy)
        add_adapter(policy, name, config.lora)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, p in policy.transformer.named_parameters():
                if "lora_" in key:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        dirs[name] = save_adapter(policy.transformer, name, tmp_path / name)
        if name == "on":
            reference = policy.transformer  # holds the "on" adapter, to compute the expected merge
    chosen = []
    monkeypatch.setattr("controller.merge.select_scale", lambda base, merged: chosen.append(merged) or 1.0)
    result = merge_sweep(config, adapter_dir(dirs["semi"]), adapter_dir(dirs["on"]), [0.0, 1.0], "pocket_fvd", tmp_path / "m")

    table = (tmp_path / "m" / "merge.md").read_text()
    assert "semi only" in table and "base" in table and "pocket_fvd" in table
    saved = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert set(saved["scales"]) == {"0.0", "1.0"} and saved["selected_scale"] == result["selected_scale"]
    rows = [saved["base"], *saved["scales"].values()]
    assert all(set(r) >= {"reward", "reward_VQ", "reward_MQ", "reward_TA", "ood"} for r in rows)
    assert len({round(r["reward"], 9) for r in rows}) > 1, "every candidate scored the same: merging changed nothing"
    assert result["selected_scale"] == 1.0 and set(chosen[0]) == {0.0, 1.0}
    merged = WanTransformer3DModel.from_pretrained(tmp_path / "m" / "merged")  # plain diffusers loads it
    layer = reference.blocks[0].attn1.to_q
    semi = build_configured_policy(config.policy)
    load_adapter(semi.transformer, dirs["semi"], "semi")
    expected = layer.get_base_layer().weight.double() + adapter_delta(semi.transformer.blocks[0].attn1.to_q, "semi") + adapter_delta(layer, "on")
    torch.testing.assert_close(merged.blocks[0].attn1.to_q.weight.double(), expected, atol=1e-5, rtol=0)


def test_adapter_dir_rejects_a_directory_without_an_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a PEFT adapter"):
        adapter_dir(tmp_path)
