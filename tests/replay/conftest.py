"""Fixtures of the replay tests: a store factory per backend and a throwaway Redis server."""

from __future__ import annotations

import signal

import pytest

import replay
from replay_testing import FAST, ThrowawayRedis

BACKENDS = ["redis", "local"]


@pytest.fixture(params=BACKENDS)
def make_store(request, tmp_path):
    """make_store(namespace, **options) opens a store of the parametrised backend (closed after the test)."""
    opened = []

    def make(namespace: str = "store", **options):
        options = {**FAST, **options}
        if request.param == "redis":
            prefix = request.getfixturevalue("redis_prefix") + namespace + ":"
            store = replay.open_store(f"redis://127.0.0.1:6379/0?prefix={prefix}", **options)
        else:
            store = replay.open_store(f"file://{tmp_path / namespace}", **options)
        opened.append(store)
        return store

    make.backend = request.param
    yield make
    for store in opened:
        store.close()


@pytest.fixture
def throwaway_redis(tmp_path):
    server = ThrowawayRedis(tmp_path)
    server.start()
    yield server
    if server.process is not None:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
        server.kill()
