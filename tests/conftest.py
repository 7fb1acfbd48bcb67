"""Shared fixtures: a real Redis with a key prefix of the test's own, cleaned up after."""

from __future__ import annotations

import os
import uuid

import pytest

REDIS_URL = os.environ.get("ARCOPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix():
    """A unique key prefix on the test Redis; every key under it is deleted after the test."""
    import redis

    prefix = f"arcopo-test:{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # no skip: the suite needs the Redis the README names
    yield prefix
    for key in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def untrained_pocket_weights(tmp_path_factory):
    """A pocket-preset weights directory with random (untrained) weights, for tests of mechanics."""
    from policy.pocket.preset import new_transformer, save_pocket_weights

    path = tmp_path_factory.mktemp("pocket_weights")
    save_pocket_weights(new_transformer(0), path, {"note": "untrained, for tests"})
    return path
