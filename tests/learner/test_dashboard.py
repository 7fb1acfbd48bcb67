"""A local run's Ray start-up: the dashboard on 127.0.0.1, its URL printed and answering; a dashboard
that cannot start leaves a running Ray without it and a logged reason."""

from __future__ import annotations

import logging
import socket
import urllib.request

import pytest
import ray

from learner.ray_cluster import init_ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    yield
    ray.shutdown()


def test_a_local_start_prints_the_dashboard_url_and_it_answers(no_ray, capsys):
    port = _free_port()
    url = init_ray(1, dashboard_port=port)
    assert url == f"http://127.0.0.1:{port}"
    assert f"Ray dashboard: {url}" in capsys.readouterr().out
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200 and b"Ray Dashboard" in response.read()


def test_a_dashboard_that_cannot_start_is_logged_and_ray_runs_without_it(no_ray, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with caplog.at_level(logging.WARNING, logger="learner.ray_cluster"):
            url = init_ray(1, dashboard_port=taken.getsockname()[1])
    assert url is None and ray.is_initialized()
    assert "dashboard could not start" in caplog.text and "occupied" in caplog.text
    assert ray.get(ray.remote(lambda: 7).remote()) == 7
