"""`python -m reward_service.serve` exposes a registered reward model over the plain scoring API;
scored through the `http` reward it gives what the model gives in-process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from pocket import domain
from reward_service.base import Video
from reward_service.registry import build_reward
from reward_service.scoring import score_isolated

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pocket_server():
    """The real command, in its own process, on a free port, with a bearer token required."""
    env = {**os.environ, "SERVE_TEST_TOKEN": "tok-123", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reward_service.serve", "--model", "pocket", "--port", "0", "--auth-token-env", "SERVE_TEST_TOKEN"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = _read_line(proc, timeout_s=60)
    assert line.startswith("serving reward 'pocket' (heads VQ, MQ, TA) on http://127.0.0.1:"), line
    yield line.rsplit(" ", 1)[1]
    proc.terminate()
    assert proc.wait(timeout=10) == 0  # SIGTERM stops it cleanly


def _read_line(proc, timeout_s: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not box or not box[0]:
        proc.kill()
        raise AssertionError(f"serve printed no ready line; stderr: {proc.stderr.read()[-2000:]}")
    return box[0].strip()


def _pocket_videos():
    prompts = [domain.heldout_prompts()[i] for i in (0, 13, 29)] + [domain.train_prompts()[5], "a dragon over the sea"]
    videos = [Video(domain.generate_video(p if i < 4 else prompts[0], seed=i), domain.FPS) for i, p in enumerate(prompts)]
    videos[2] = Video(np.ascontiguousarray(videos[2].frames[:, ::-1]), domain.FPS)  # a worse video: the shapes move wrongly
    return videos, prompts


def test_pocket_served_over_http_scores_like_pocket_in_process(pocket_server, monkeypatch):
    monkeypatch.setenv("CLIENT_TOKEN", "tok-123")
    videos, prompts = _pocket_videos()
    remote = build_reward("http", url=pocket_server, auth_token_env="CLIENT_TOKEN", batch_size=2, concurrency=2)
    assert remote.heads == ("VQ", "MQ", "TA")  # from the server's /info

    local = build_reward("pocket")
    want = score_isolated([local], videos, prompts)
    got = score_isolated([remote], videos, prompts)
    assert [r.valid for r in got] == [r.valid for r in want] == [True, True, True, True, False]
    for g, w in zip(got[:4], want[:4]):
        assert g.scores == w.scores  # bit-equal: raw frames travel exactly, JSON floats round-trip
    assert len({tuple(r.scores.values()) for r in want[:4]}) == 4
    # The sample pocket cannot score carries the server's reason through to the run.
    assert got[4].reason == f"unscored: http: server: {want[4].reason}"
    assert "pocket grammar" in got[4].reason


def test_serve_refuses_bad_requests_by_name(pocket_server):
    assert requests.get(f"{pocket_server}/health", timeout=10).json() == {"status": "ok"}
    reply = requests.get(f"{pocket_server}/info", timeout=10)
    assert reply.status_code == 401 and "bearer token" in reply.json()["error"]
    auth = {"Authorization": "Bearer tok-123"}
    bad = {"prompts": ["a"], "videos": [{"format": "frames", "data": "AAAA", "fps": 8, "shape": [1, 2, 2, 3]}]}
    reply = requests.post(f"{pocket_server}/score", json=bad, headers=auth, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"] == "videos[0]: frames of shape [1, 2, 2, 3] need 12 bytes, got 3"
    reply = requests.post(f"{pocket_server}/score", json={"prompts": ["a", "b"], "videos": []}, headers=auth, timeout=10)
    assert reply.status_code == 400 and "got 0 videos but 2 prompts" in reply.json()["error"]


def test_videoalign_served_in_process_scores_like_videoalign(tmp_path):
    """The same app around the VideoAlign model (a tiny checkpoint in the published layout)."""
    from aiohttp import web

    from reward_service.serve import make_app
    from tiny_videoalign import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path, layout="full")
    model = build_reward("videoalign", checkpoint_dir=str(ckpt.root), min_frame_pixels=3136)
    rng = np.random.default_rng(3)
    videos = [Video(rng.integers(0, 256, (8, 40, 56, 3), dtype=np.uint8), 8.0) for _ in range(3)]
    prompts = ["a red ball", "two cats", "rain"]
    want = model.score(videos, prompts)

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(model))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    url = "http://127.0.0.1:%d" % runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        got = build_reward("http", url=url, batch_size=2).score(videos, prompts)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    for head in ("VQ", "MQ", "TA"):
        np.testing.assert_array_equal(got[head], want[head])
    assert np.ptp(want["VQ"]) > 0
