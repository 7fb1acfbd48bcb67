"""Shared fixtures: a real Redis with a key prefix of the test's own, cleaned up after."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture
def single_torch_thread():
    """Tiny models are dominated by per-op overhead; a second intra-op thread only adds contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def untrained_pocket_weights(tmp_path_factory):
    """A pocket-preset weights directory with random (untrained) weights, for tests of mechanics."""
    from pocket.preset import new_transformer, save_pocket_weights

    path = tmp_path_factory.mktemp("pocket_weights")
    save_pocket_weights(new_transformer(0), path, {"note": "untrained, for tests"})
    return path


_session_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _session_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's own status once pytest is done, before interpreter teardown.

    A full run has been seen to pass every test, print its summary and then die with a segmentation
    fault while the interpreter tore down (native threads and destructors of the extension modules the
    suite loads: Ray, gRPC, torch), so `make test` failed on a run whose every test passed. The status
    is the one pytest decided (failures and "no tests ran" included); nothing is skipped but teardown.
    """
    if _session_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_session_status[-1])
