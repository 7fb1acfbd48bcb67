"""`reward.model: http`, dialect `openai_chat`: a VLM judge behind an OpenAI-compatible
chat-completions API, played by a real local server that records the requests and scripts replies."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from local_http_server import LocalServer, json_reply
from reward_service.base import Video
from reward_service.registry import build_reward
from reward_service.scoring import score_isolated


def chat_reply(text: str):
    return json_reply({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


@pytest.fixture
def server():
    srv = LocalServer(reply=lambda r: chat_reply('{"VQ": 1, "MQ": 2}'))
    yield srv
    srv.close()


def _judge(server, judge: dict, **options):
    judge = {"model": "judge-vlm", **judge}
    return build_reward("http", url=f"{server.url}/v1", dialect="openai_chat", judge=judge, backoff_s=0.01, **options)


def _video(t: int = 10, seed: int = 0) -> Video:
    return Video(np.random.default_rng(seed).integers(0, 256, (t, 12, 16, 3), dtype=np.uint8), 8.0)


def _prompt_of(request) -> str:
    return request.body["messages"][-1]["content"][-1]["text"]


def test_the_request_carries_sampled_frames_as_data_urls_and_the_filled_template(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-local")
    template = 'Rate "{prompt}" for VQ and MQ. Answer as JSON: {"VQ": <0-10>, "MQ": <0-10>}'
    server.reply = lambda r: chat_reply('Sure.\n```json\n{"VQ": 7.5, "MQ": 3}\n```')
    model = _judge(
        server, {"template": template, "system": "You are a strict judge.", "num_frames": 4, "image_format": "png",
                 "extra_body": {"top_p": 1.0}},
        heads=["VQ", "MQ"], auth_token_env="JUDGE_KEY",
    )
    video = _video(10)
    out = model.score([video], ["a red ball"])
    assert out["VQ"].tolist() == [7.5] and out["MQ"].tolist() == [3.0]

    (request,) = server.posts("/v1/chat/completions")
    assert request.headers["Authorization"] == "Bearer sk-local"
    body = request.body
    assert body["model"] == "judge-vlm" and body["temperature"] == 0.0 and body["top_p"] == 1.0
    assert body["messages"][0] == {"role": "system", "content": "You are a strict judge."}
    parts = body["messages"][1]["content"]
    assert parts[-1] == {"type": "text", "text": template.replace("{prompt}", "a red ball")}
    images = [p["image_url"]["url"] for p in parts[:-1]]
    assert all(p["type"] == "image_url" for p in parts[:-1]) and len(images) == 4
    for url, index in zip(images, [0, 3, 6, 9]):  # evenly spaced, first and last included
        assert url.startswith("data:image/png;base64,")
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
        np.testing.assert_array_equal(pixels, video.frames[index])  # PNG: lossless


def test_a_template_per_head_asks_once_per_head_and_reads_the_first_number(server):
    def per_head(request):
        return chat_reply("Score: 8/10" if "motion" in _prompt_of(request) else "I'd say 2.5 out of 10.")

    server.reply = per_head
    model = _judge(server, {"template": {"MQ": "Rate the motion of {prompt}.", "TA": "Does it show {prompt}?"}}, concurrency=3)
    assert model.heads == ("MQ", "TA")
    out = model.score([_video(seed=1), _video(seed=2)], ["a cat", "a dog"])
    assert out["MQ"].tolist() == [8.0, 8.0] and out["TA"].tolist() == [2.5, 2.5]
    asked = sorted(_prompt_of(r) for r in server.posts("/v1/chat/completions"))
    assert asked == ["Does it show a cat?", "Does it show a dog?", "Rate the motion of a cat.", "Rate the motion of a dog."]
    assert all(len(r.body["messages"][0]["content"]) == 8 + 1 for r in server.received)  # default 8 frames + text


def test_regex_and_json_path_parsers(server):
    server.reply = lambda r: chat_reply("Visual quality: 6. Motion quality = 4.")
    model = _judge(server, {"template": "{prompt}", "score_regex": {"VQ": r"Visual quality:\s*(\d+)", "MQ": r"Motion quality\s*=\s*(\d+)"}})
    out = model.score([_video()], ["p"])
    assert (out["VQ"][0], out["MQ"][0]) == (6.0, 4.0)

    server.reply = lambda r: chat_reply("VQ=3 MQ=9")
    out = _judge(server, {"template": "{prompt}", "score_regex": r"{head}=(\d+)"}, heads=["VQ", "MQ"]).score([_video()], ["p"])
    assert (out["VQ"][0], out["MQ"][0]) == (3.0, 9.0)

    server.reply = lambda r: chat_reply(json.dumps({"verdict": {"overall": "4.25"}, "why": "fine"}))
    out = _judge(server, {"template": "{prompt}", "score_json": "verdict.overall"}).score([_video()], ["p"])
    assert out["score"].tolist() == [4.25]  # one head named "score" by default


def test_unparseable_or_out_of_range_replies_invalidate_only_their_video(server):
    replies = {"good": '{"score": 4}', "prose": "I cannot rate this video.", "range": '{"score": 11}', "nan": '{"score": "NaN"}'}
    server.reply = lambda r: chat_reply(replies[_prompt_of(r)])
    model = _judge(server, {"template": "{prompt}", "score_range": [0, 10]}, max_attempts=3)
    results = score_isolated([model], [_video(seed=i) for i in range(4)], list(replies))
    assert [r.valid for r in results] == [True, False, False, False]
    assert results[0].scores == {"score": 4.0}
    assert results[1].reason == "unscored: http: no score for head score (JSON field 'score') in the reply 'I cannot rate this video.'"
    assert "outside score_range [0.0, 10.0]" in results[2].reason
    assert "no score for head score" in results[3].reason
    assert len(server.posts("/v1/chat/completions")) == 4  # an unusable answer is not asked again


def test_server_failures_of_the_judge(server):
    calls = {"n": 0}

    def overloaded_once(request):
        calls["n"] += 1
        return (503, b"busy", 0.0) if calls["n"] == 1 else chat_reply('{"score": 5}')

    server.reply = overloaded_once
    assert _judge(server, {"template": "{prompt}"}).score([_video()], ["p"])["score"].tolist() == [5.0]
    assert calls["n"] == 2

    server.reply = lambda r: (200, b'{"choices": []}', 0.0)
    results = score_isolated([_judge(server, {"template": "{prompt}"})], [_video()], ["p"])
    assert results[0].reason.startswith("unscored: http: not a chat-completions reply (IndexError")

    server.reply = lambda r: chat_reply('{"score": 5}')[:2] + (2.0,)
    results = score_isolated([_judge(server, {"template": "{prompt}"}, timeout_s=0.5, max_attempts=1)], [_video()], ["p"])
    assert results[0].reason.startswith("unscored: http: no reply within 0.5s")


@pytest.mark.parametrize(
    "judge, options, message",
    [
        ({"template": "x", "score_regex": "(", }, {}, "not a valid regular expression"),
        ({"template": "x", "score_regex": "(\\d)", "score_json": "a"}, {}, "score_regex or score_json, not both"),
        ({"template": {"A": "x"}}, {"heads": ["B"]}, "differ from the judge's template heads"),
        ({"template": "x", "score_json": {"A": "a"}}, {"heads": ["A", "B"]}, "score_json names heads"),
        ({"template": "x", "temperatur": 0}, {}, "temperatur"),
    ],
)
def test_bad_judge_options_are_named(server, judge, options, message):
    with pytest.raises(ValueError, match=message):
        _judge(server, judge, **options)
