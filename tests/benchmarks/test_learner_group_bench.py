"""The learner-group benchmark runs on the real group (1 and 2 gloo ranks, a few simulated groups) and
returns one scaling ratio per count, against an independent reading of its own times."""

from __future__ import annotations

import pytest

from benchmarks.learner_group_bench import measure_learner_times, scaling_from_times


@pytest.mark.usefixtures("single_torch_thread")
def test_learner_scaling_runs_and_returns_a_ratio_per_count():
    times = measure_learner_times(counts=(1, 2), groups=2, update_s_per_group=0.2, updates=1, iterations=1)
    assert set(times) == {"1", "2"} and all(t > 0 for t in times.values())
    # One learner sleeps 2 x 0.2 s, each of two ranks 0.2 s: every time holds its simulated device time.
    assert times["1"] >= 0.4 and times["2"] >= 0.2
    scaling = scaling_from_times(times)
    assert scaling["1"] == 1.0 and scaling["2"] == pytest.approx(times["1"] / times["2"] / 2)
