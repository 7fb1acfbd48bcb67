"""The real-size CPU smoke at the real width (1536) with one block, a small group, one anchor and a narrow
VAE (the decode is not what this checks; on a CPU without native bf16 the real-width VAE alone takes
most of a minute). The full 30-block run is `python -m benchmarks.real_size_smoke`."""

from __future__ import annotations

import pytest

from benchmarks.real_size_smoke import SMALL_GROUP, run_smoke
from controller.config import load_config


@pytest.mark.slow
def test_real_width_smoke_runs_with_the_real_configs_settings():
    config = load_config("configs/self_forcing.yaml", SMALL_GROUP + ["algorithm.anchors_per_group=1"])
    assert config.policy.activation_checkpointing and config.algorithm.micro_batch_size == 2 and config.lora.rank == 64
    report = run_smoke(config, latent=(16, 4, 4), num_chunks=2, num_layers=1, vae_config={"base_dim": 16})
    assert report["kv_cache_dtype"] == "torch.bfloat16"
    moved, total = map(int, report["adapter_tensors_moved"].split("/"))
    assert moved == total == 20  # 10 adapted Linears (attn1, attn2: q, k, v, out; ffn: 2) x (A, B)
    assert report["replay_tensor_peak_gib"] == pytest.approx(report["planned_replay_peak_gib"], rel=0.15)
