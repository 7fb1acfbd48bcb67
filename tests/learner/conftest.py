"""Fixtures for the learner's end-to-end tests: one local Ray cluster per module (never on port 6379)."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
