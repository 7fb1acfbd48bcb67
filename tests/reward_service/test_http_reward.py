"""`reward.model: http`, plain scoring dialect, against a real local server the tests script:
batching, MP4, auth, and every way a server fails (slow, 500, 4xx, garbage, wrong length, refused)."""

from __future__ import annotations

import base64
import re
import socket
import tempfile

import numpy as np
import pytest

from local_http_server import LocalServer, json_reply
from reward_service.base import Video
from reward_service.registry import build_reward
from reward_service.scoring import score_isolated

HEADS = ["R", "G", "B"]


def _videos(n: int, seed: int = 0) -> list[Video]:
    rng = np.random.default_rng(seed)
    return [Video(rng.integers(0, 256, (3 + i % 3, 6, 8, 3), dtype=np.uint8), 8.0) for i in range(n)]


def _frames(payload: dict) -> np.ndarray:
    """The frames a 'frames' payload carries, decoded here by hand (not by the code under test)."""
    raw = base64.b64decode(payload["data"])
    return np.frombuffer(raw, dtype=np.uint8).reshape(payload["shape"])


def _channel_means(frames: np.ndarray) -> list[float]:
    return (frames.reshape(-1, 3).mean(axis=0) / 255.0).tolist()


def brightness_server(request, misbehave=None):
    """A reward server scoring each video by its mean R, G, B; `misbehave(request)` may override."""
    if request.method == "GET" and request.path == "/info":
        return json_reply({"model": "brightness", "heads": HEADS})
    if misbehave is not None and (override := misbehave(request)) is not None:
        return override
    means = [_channel_means(_frames(v)) for v in request.body["videos"]]
    return json_reply({"heads": HEADS, "scores": {h: [m[k] for m in means] for k, h in enumerate(HEADS)}})


@pytest.fixture
def server():
    srv = LocalServer(reply=brightness_server)
    yield srv
    srv.close()


def _reward(server, **options):
    options = {"url": server.url, "backoff_s": 0.01, "backoff_max_s": 0.02, **options}
    return build_reward("http", **options)


def _expected(videos):
    return np.array([_channel_means(v.frames) for v in videos])


def test_batches_go_out_concurrently_and_scores_return_in_order(server):
    videos = _videos(7)
    model = _reward(server, batch_size=3, concurrency=2)
    assert model.heads == tuple(HEADS)  # read from GET /info
    out = model.score(videos, [f"p{i}" for i in range(7)])
    np.testing.assert_array_equal(np.stack([out[h] for h in HEADS], axis=1), _expected(videos))
    posts = server.posts("/score")
    assert sorted(len(p.body["videos"]) for p in posts) == [1, 3, 3]
    sent = {p: _frames(v) for post in posts for p, v in zip(post.body["prompts"], post.body["videos"])}
    for i, video in enumerate(videos):  # frames arrive bit-exact, with their prompt
        np.testing.assert_array_equal(sent[f"p{i}"], video.frames)
    assert model.last_errors == {}


def test_mp4_videos_arrive_as_decodable_h264(server):
    t, h, w = 6, 32, 48
    ramp = np.linspace(40, 200, w, dtype=np.float64)[None, None, :, None]
    frames = np.broadcast_to(ramp + 3 * np.arange(t)[:, None, None, None], (t, h, w, 3)).astype(np.uint8)
    decoded = []

    def mp4_server(request):
        if request.method == "POST":
            import imageio.v3 as iio

            payload = request.body["videos"][0]
            assert payload["format"] == "mp4" and payload.get("shape") is None
            with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
                f.write(base64.b64decode(payload["data"]))
                f.flush()
                decoded.append(iio.imread(f.name))
            return json_reply({"heads": ["x"], "scores": {"x": [1.0]}})
        return json_reply({"model": "m", "heads": ["x"]})

    server.reply = mp4_server
    out = _reward(server, video_format="mp4").score([Video(frames, 8.0)], ["p"])
    assert out["x"].tolist() == [1.0]
    assert decoded[0].shape == frames.shape
    assert np.abs(decoded[0].astype(int) - frames).mean() < 3.0  # lossy, but the same video


def test_bearer_token_comes_from_the_named_environment_variable(server, monkeypatch):
    monkeypatch.setenv("REWARD_TEST_TOKEN", "s3cret")
    _reward(server, heads=HEADS, auth_token_env="REWARD_TEST_TOKEN").score(_videos(1), ["p"])
    assert server.posts("/score")[0].headers["Authorization"] == "Bearer s3cret"
    monkeypatch.delenv("REWARD_TEST_TOKEN")
    with pytest.raises(ValueError, match="REWARD_TEST_TOKEN"):
        _reward(server, heads=HEADS, auth_token_env="REWARD_TEST_TOKEN")


def test_a_slow_reply_times_out_retries_and_only_its_video_is_invalid(server):
    server.reply = lambda r: brightness_server(r, lambda q: brightness_server(q)[:2] + (2.0,) if "SLOW" in q.body["prompts"] else None)
    videos, prompts = _videos(3), ["a", "SLOW", "c"]
    model = _reward(server, heads=HEADS, batch_size=1, timeout_s=0.5, max_attempts=2)
    results = score_isolated([model], videos, prompts)
    assert [r.valid for r in results] == [True, False, True]
    assert results[1].reason.startswith("unscored: http: no reply within 0.5s")
    assert "gave up after 2 attempts" in results[1].reason
    assert all(np.isnan(v) for v in results[1].scores.values())
    assert [p.body["prompts"] for p in server.posts("/score")].count(["SLOW"]) == 2
    np.testing.assert_array_equal([results[0].scores[h] for h in HEADS], _channel_means(videos[0].frames))


def test_500_is_retried_with_backoff_then_scored_or_invalid(server):
    failures = {"left": 2}

    def flaky(request):
        if failures["left"] > 0:
            failures["left"] -= 1
            return 500, b"internal error", 0.0
        return None

    server.reply = lambda r: brightness_server(r, flaky)
    videos = _videos(2)
    out = _reward(server, heads=HEADS, max_attempts=3).score(videos, ["a", "b"])
    np.testing.assert_array_equal(np.stack([out[h] for h in HEADS], axis=1), _expected(videos))
    assert len(server.posts("/score")) == 3

    server.received.clear()
    server.reply = lambda r: brightness_server(r, lambda q: (503, b"overloaded", 0.0))
    model = _reward(server, heads=HEADS, max_attempts=3)
    results = score_isolated([model], videos, ["a", "b"])
    assert not any(r.valid for r in results)
    assert "HTTP 503" in results[0].reason and "overloaded" in results[0].reason
    assert "gave up after 3 attempts" in results[0].reason
    assert len(server.posts("/score")) == 3


def test_a_client_error_is_not_retried(server):
    server.reply = lambda r: brightness_server(r, lambda q: json_reply({"error": "bad prompt"}, status=400))
    results = score_isolated([_reward(server, heads=HEADS, max_attempts=3)], _videos(1), ["a"])
    assert results[0].reason.startswith("unscored: http: HTTP 400") and "bad prompt" in results[0].reason
    assert len(server.posts("/score")) == 1


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"<html>gateway oops</html>", "unusable reply.*Invalid JSON.*gateway oops"),
        (b'{"heads": ["R", "G", "B"], "scores": {"R": [0.1], "G": [0.2]}}', "unusable reply.*scores hold heads"),
        (b'{"heads": ["R", "G", "B"], "scores": {"R": [0.1], "G": [0.2], "B": [0.3]}}', "returned 1 scores for 2 videos"),
        (b'{"heads": ["R", "G"], "scores": {"R": [0.1, 0.2], "G": [0.2, 0.3]}}', r"returned no head \['B'\]"),
        (b'{"heads": ["R", "G", "B"], "scores": {"R": [0.1, "x"], "G": [0.2, 0.3], "B": [0, 0]}}', "unusable reply"),
    ],
    ids=["garbage", "inconsistent", "wrong_length", "missing_head", "not_a_number"],
)
def test_unusable_replies_make_the_batch_invalid_without_retrying(server, body, reason):
    server.reply = lambda r: brightness_server(r, lambda q: (200, body, 0.0))
    model = _reward(server, heads=HEADS, batch_size=2, max_attempts=3)
    out = model.score(_videos(2), ["a", "b"])
    assert all(np.isnan(out[h]).all() for h in HEADS)
    assert set(model.last_errors) == {0, 1}
    assert re.search(reason, model.last_errors[0]), model.last_errors[0]
    assert len(server.posts("/score")) == 1


def test_the_servers_per_video_errors_and_nulls_become_invalid_rewards(server):
    def one_unscored(request):
        n = len(request.body["videos"])
        return json_reply({
            "heads": HEADS,
            "scores": {h: [0.5] * (n - 1) + [None] for h in HEADS},
            "errors": [None] * (n - 1) + ["no face found"],
        })

    server.reply = lambda r: brightness_server(r, one_unscored)
    results = score_isolated([_reward(server, heads=HEADS, batch_size=3)], _videos(3), ["a", "b", "c"])
    assert [r.valid for r in results] == [True, True, False]
    assert results[2].reason == "unscored: http: server: no face found"
    assert results[0].scores == {"R": 0.5, "G": 0.5, "B": 0.5}


def test_a_refused_connection_is_retried_then_invalid_and_an_unreachable_info_is_named():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    model = build_reward("http", url=url, heads=["x"], max_attempts=2, backoff_s=0.01)
    results = score_isolated([model], _videos(1), ["a"])
    assert results[0].reason.startswith(f"unscored: http: cannot connect to {url}/score")
    assert model.transport.attempts == 2
    with pytest.raises(RuntimeError, match=r"/info.*reward\.options\.heads"):
        build_reward("http", url=url, max_attempts=1)


def test_through_the_reward_pool_a_failing_server_invalidates_only_its_videos(server):
    """The real pool on Ray: the http reward inside a reward actor; the run gets results for all."""
    import os
    from pathlib import Path

    import ray

    from reward_service.pool import RewardPool

    server.reply = lambda r: brightness_server(r, lambda q: (500, b"boom", 0.0) if "BOOM" in q.body["prompts"] else None)
    root = str(Path(__file__).resolve().parents[2])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, saved) if p)
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        pool = RewardPool([("http", {"url": server.url, "batch_size": 1, "max_attempts": 2, "backoff_s": 0.01})], batch_size=3)
        videos = _videos(3)
        results = pool.score(videos, ["a", "BOOM", "c"])
        assert [r.valid for r in results] == [True, False, True]
        assert results[1].reason.startswith("unscored: http: HTTP 500") and "boom" in results[1].reason
        np.testing.assert_array_equal([results[2].scores[h] for h in HEADS], _channel_means(videos[2].frames))
        assert pool.metrics()["invalid_samples"] == {"unscored": 1}
        assert pool.heads == tuple(HEADS)  # asked from the server's /info inside the actor
        pool.shutdown()
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.mark.parametrize(
    "options, message",
    [
        ({"url": "localhost:8000"}, "url must start with http"),
        ({"url": "http://h", "heads": ["x"], "dialect": "openai_chat"}, "judge options are required"),
        ({"url": "http://h", "heads": ["x"], "batch_size": 0}, "batch_size"),
        ({"url": "http://h", "heads": ["x"], "retries": 3}, "retries"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        build_reward("http", **options)
