"""A local run's Ray start-up: the dashboard on 127.0.0.1, its URL printed and answering during the
run; a dashboard that cannot start leaves a running Ray without it and a logged reason."""

from __future__ import annotations

import logging
import re
import socket
import time
import urllib.request

import pytest
import ray

from controller.config import load_config
from controller.driver import train
from controller.ray_cluster import init_ray


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


def test_a_dashboard_that_cannot_start_is_logged_and_ray_runs_without_it(no_ray, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with caplog.at_level(logging.WARNING, logger="controller.ray_cluster"):
            url = init_ray(1, dashboard_port=taken.getsockname()[1])
    assert url is None and ray.is_initialized()
    assert "dashboard could not start" in caplog.text and "occupied" in caplog.text
    assert ray.get(ray.remote(lambda: 7).remote()) == 7


@pytest.mark.slow
def test_a_run_prints_the_dashboard_url_and_it_answers_during_the_run(no_ray, tmp_path, capsys, untrained_pocket_weights):
    port = _free_port()
    answers = []

    answers_text = []

    def probe(system, row):
        answers_text.append(capsys.readouterr().out)
        url = re.search(r"Ray dashboard: (\S+)", answers_text[0]).group(1)
        with urllib.request.urlopen(url, timeout=30) as response:
            answers.append((url, response.status, b"Ray Dashboard" in response.read()))

    small = ["rollout.num_workers=1", "algorithm.group_size=2", "algorithm.anchors_per_group=1",
             "algorithm.groups_per_iteration=1", "lora.rank=2", "lora.alpha=4", "run.eval_prompts_limit=1",
             "run.iterations=1", f"run.dashboard_port={port}", f"policy.transformer_checkpoint={untrained_pocket_weights}"]
    train(load_config(None, small), tmp_path / "run", on_iteration=probe)
    assert answers == [(f"http://127.0.0.1:{port}", 200, True)]

    # The run's metrics on the node's Prometheus endpoint (printed too); processes report every 10 s.
    metrics_url = re.search(r"Prometheus metrics \(ray_arcopo_\*\): (\S+)", answers_text[0]).group(1)
    deadline, text = time.monotonic() + 60, ""
    while "ray_arcopo_policy_version" not in text and time.monotonic() < deadline:
        time.sleep(1)
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    assert re.search(r"^ray_arcopo_policy_version\{.*\} 1\.0$", text, re.M), text[-2000:]
