"""Pivot draws: uniform by default (the paper's), weighted per chunk when `algorithm.pivot_weights` is set."""

import numpy as np
import pytest

from controller.config import ConfigError, load_config
from controller.task_sampler import TaskSampler

PROMPTS = ["a red circle moving left on a dark background", "two blue squares moving up on a grey background"]


def _pivot_counts(overrides: list[str], iterations: int = 500, per_iteration: int = 8, chunks: int = 4) -> np.ndarray:
    sampler = TaskSampler(load_config(None, overrides), PROMPTS, num_chunks=chunks)
    pivots = [t.pivot for it in range(iterations) for t in sampler.tasks(it, per_iteration)]
    return np.bincount(pivots, minlength=chunks)


def test_unset_weights_draw_the_pivot_uniformly_as_the_paper():
    overrides = ["algorithm.pivot_weights=null"]
    counts = _pivot_counts(overrides)
    n = counts.sum()
    # 4000 draws, p = 1/4 each: binomial sd ~27, so 5 sd is ~137
    assert np.all(np.abs(counts - n / 4) < 5 * np.sqrt(n * 0.25 * 0.75)), counts
    # the uniform path draws the pivot exactly as before the option existed: rng.integers(L) after the prompt and seed
    sampler = TaskSampler(load_config(None, overrides), PROMPTS, num_chunks=4)
    rng = np.random.default_rng([0, 3, 0])
    expected = []
    for _ in range(5):
        rng.integers(len(PROMPTS)), rng.integers(2**62)
        expected.append(int(rng.integers(4)))
    assert [t.pivot for t in sampler.tasks(3, 5)] == expected


def test_weights_set_each_chunks_share_of_pivots():
    counts = _pivot_counts(["algorithm.pivot_weights=[4, 3, 2, 1]"])
    n = counts.sum()
    p = np.array([0.4, 0.3, 0.2, 0.1])
    assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p))), counts
    assert counts[0] > counts[1] > counts[2] > counts[3]


def test_a_zero_weight_chunk_is_never_the_pivot():
    counts = _pivot_counts(["algorithm.pivot_weights=[1, 0, 1, 0]"], iterations=50)
    assert counts[1] == counts[3] == 0 and counts[0] > 0 and counts[2] > 0


def test_bad_weights_are_named():
    with pytest.raises(ConfigError, match="pivot_weights"):
        load_config(None, ["algorithm.pivot_weights=[1, -1, 1, 1]"])
    with pytest.raises(ConfigError, match="pivot_weights"):
        load_config(None, ["algorithm.pivot_weights=[0, 0, 0, 0]"])
    with pytest.raises(ValueError, match=r"pivot_weights has 3 entries but the policy has 4 chunks"):
        TaskSampler(load_config(None, ["algorithm.pivot_weights=[1, 1, 1]"]), PROMPTS, num_chunks=4)
