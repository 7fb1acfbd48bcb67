"""`benchmarks.gpu_bench --dry-run`: the GPU benchmark's code path at the tiny preset on the CPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_bench import bf16_peak, peak_for_name, run_bench
from controller.config import load_config

SMALL_GROUP = ["algorithm.group_size=4", "algorithm.anchors_per_group=2", "rollout.branch_batch_size=2"]


@pytest.mark.slow
def test_dry_run_table_and_numbers():
    config = load_config("configs/self_forcing.yaml", SMALL_GROUP)
    rows, raw = run_bench(config, dry_run=True)
    labels = [label for label, _, _ in rows]
    for expected in ("lora broadcast", "generate 1 video", "forked group G=4, batch 2", "group speed-up vs G videos",
                     "VAE decode 1 video", "learner update", "update memory above resident", "MFU forked group"):
        assert expected in labels
    # Counted forwards: T + 1 per chunk (4 steps + the cache write); 2 chunks, forked at chunk 1.
    steps, chunks, pivot, g = 4, 2, 1, 4
    assert raw["video_forwards"] == chunks * (steps + 1)
    assert raw["group_forwards"] == (pivot + g * (chunks - pivot)) * (steps + 1)
    assert raw["counted_ratio"] == pytest.approx(g * chunks / (pivot + g * (chunks - pivot)))
    # The update's memory above the resident state is what the planner predicts for it.
    assert raw["update_bytes"] == pytest.approx(raw["planned_update_bytes"], rel=0.15)
    # Broadcast: every adapter tensor, in the workers' dtype (bf16: 2 bytes an entry).
    assert raw["broadcast_bytes"] > 0 and raw["broadcast_bytes"] % 2 == 0
    assert min(raw["MFU generate 1 video"], raw["MFU forked group"], raw["MFU learner update"]) > 0


def test_bf16_peak_lookup_by_card_name():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_for_name("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_for_name("NVIDIA H100 NVL") == pytest.approx(835e12)
    assert peak_for_name("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_for_name("NVIDIA H200 NVL") == pytest.approx(835e12)
    assert peak_for_name("NVIDIA GeForce RTX 4090") is None
    assert bf16_peak(torch.device("cpu")) == ("cpu", None)
