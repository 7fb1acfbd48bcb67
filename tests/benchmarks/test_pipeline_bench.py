"""`benchmarks.pipeline_bench --json` at a tiny size: the keys the note and the docs read, and the facts
that hold whatever the machine's load (no speed threshold: speed is the benchmark's to print)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import pipeline_bench


@pytest.mark.slow
def test_tiny_bench_prints_both_modes_ratios_as_json(capsys, monkeypatch):
    monkeypatch.setattr(pipeline_bench, "learner_scaling", lambda counts=pipeline_bench.LEARNER_COUNTS: {"1": 1.0})
    code = pipeline_bench.main(["--json", "--rollout-s", "0.05", "--update-s", "0.02", "--workers", "1", "--groups", "2",
                                "--iterations", "3"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"sync_ratio", "pipelined_ratio", "learner_scaling"} <= set(result)
    assert result["learner_scaling"] == {"1": 1.0}  # the learner group's hook is passed through as it answers
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("sync_ratio", "pipelined_ratio", "longer_phase_s"))
    # Sequential iterations hold both phases one after the other: never shorter than the longer one.
    assert result["sync_ratio"] >= 1.0
    assert result["sync_iterations_per_s"] == pytest.approx(1 / result["sync_iteration_s"])

