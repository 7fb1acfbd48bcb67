"""Shared pieces of the replay tests: test groups, an exact comparison of groups, a throwaway Redis."""

from __future__ import annotations

import socket
import subprocess
import time

import redis
import torch

from replay.record import CandidateGroup
from replay.synthetic import synthetic_group

FAST = dict(push_timeout_s=0.3, claim_idle_s=0.3, poll_interval_s=0.02, retry_backoff_s=0.02)


def group(seed: int = 0, **kwargs) -> CandidateGroup:
    kwargs.setdefault("group_id", f"group-{seed}")
    kwargs.setdefault("created_at", 1_700_000_000.25 + seed)
    return synthetic_group(seed=seed, **kwargs)


def assert_same_group(actual: CandidateGroup, expected: CandidateGroup) -> None:
    """Every field equal, tensors bit for bit with the same dtype and shape."""
    for name in type(expected).model_fields:
        a, e = getattr(actual, name), getattr(expected, name)
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == e.dtype and a.shape == e.shape, name
            assert torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a,
                               e.view(torch.uint8) if e.dtype != torch.bool else e), name
        elif isinstance(e, dict):
            assert list(a) == list(e), name
            for head in e:
                assert a[head].dtype == torch.float64 and torch.equal(a[head], e[head]), (name, head)
        else:
            assert a == e and type(a) is type(e), (name, a, e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayRedis:
    """A private redis-server on a free port (never the shared one on 6379), killed at teardown."""

    def __init__(self, directory, password: str | None = None):
        self.port = free_port()
        self.directory = directory
        self.password = password
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
