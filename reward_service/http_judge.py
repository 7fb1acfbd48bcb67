"""The OpenAI-compatible chat-completions judge: a VLM server (vLLM, SGLang, an API) rates a video.

One request per video (or, with a template per head, one per video and head) to
`POST {url}/chat/completions`:

    {"model": judge.model,
     "messages": [{"role": "system", "content": judge.system},                       (if set)
                  {"role": "user", "content": [
                      {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}},  x num_frames
                      {"type": "text", "text": template with {prompt} replaced}]}],
     "max_tokens": ..., "temperature": ..., **extra_body}

The score of a head is read from `choices[0].message.content`: a number captured by `score_regex`
(group 1, or the whole match), or the field `score_json` of the JSON object in the reply (code
fences and text around it are tolerated; a dotted path reaches nested fields). A reply without a
number, or one outside `score_range`, makes that video invalid with the reply quoted.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from reward_service.base import Video

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
FIRST_NUMBER = f"({_NUMBER})"


class UnparseableReply(ValueError):
    """The judge answered, but no score could be read from the answer."""


class JudgeOptions(BaseModel):
    """`reward.options.judge` of the `openai_chat` dialect."""

    model_config = ConfigDict(extra="forbid")

    model: str  # the request's "model" field (the name the server serves)
    # The user message; "{prompt}" is replaced by the video's prompt (other braces are left alone,
    # so a template may show a JSON answer format). A dict {head: template} asks once per head.
    template: str | dict[str, str]
    system: str | None = None
    num_frames: int = Field(8, ge=1)  # evenly spaced frames, first and last included
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(90, ge=1, le=100)
    # How to read a head's score (at most one of the two). Either may be one value for every head
    # ("{head}" in a regex is replaced by the escaped head name) or a dict {head: value}.
    # Default: a shared template -> the JSON field named like the head; per-head templates -> the
    # first number in the reply.
    score_regex: str | dict[str, str] | None = None
    score_json: str | dict[str, str] | None = None
    score_range: tuple[float, float] | None = None  # inclusive; a score outside it is invalid
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    extra_body: dict[str, Any] = Field(default_factory=dict)  # merged into every request

    @model_validator(mode="after")
    def _one_parser(self) -> JudgeOptions:
        if self.score_regex is not None and self.score_json is not None:
            raise ValueError("judge: set score_regex or score_json, not both")
        regex = self.score_regex
        for pattern in regex.values() if isinstance(regex, dict) else [regex] if regex else []:
            try:
                re.compile(pattern.replace("{head}", "x"))
            except re.error as exc:
                raise ValueError(f"judge.score_regex {pattern!r} is not a valid regular expression: {exc}") from exc
        if self.score_range is not None and not self.score_range[0] <= self.score_range[1]:
            raise ValueError(f"judge.score_range must be [low, high], got {list(self.score_range)}")
        return self

    def heads(self, declared: list[str] | None) -> tuple[str, ...]:
        """The heads: the template dict's keys, else `declared`, else a parser dict's keys, else ("score",)."""
        if isinstance(self.template, dict):
            if declared is not None and list(declared) != list(self.template):
                raise ValueError(f"heads {declared} differ from the judge's template heads {list(self.template)}")
            return tuple(self.template)
        if declared:
            return tuple(declared)
        parser = self.score_regex if self.score_regex is not None else self.score_json
        return tuple(parser) if isinstance(parser, dict) else ("score",)

    def requests_for(self, heads: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
        """(template, heads read from its reply) per request of one video."""
        if isinstance(self.template, dict):
            return [(self.template[h], (h,)) for h in heads]
        return [(self.template, heads)]

    def check_heads(self, heads: tuple[str, ...]) -> None:
        for name, value in (("score_regex", self.score_regex), ("score_json", self.score_json)):
            if isinstance(value, dict) and set(value) != set(heads):
                raise ValueError(f"judge.{name} names heads {sorted(value)}, the reward's heads are {list(heads)}")


def request_body(options: JudgeOptions, video: Video, prompt: str, template: str) -> dict:
    content: list[dict] = [
        {"type": "image_url", "image_url": {"url": url}} for url in frame_data_urls(video, options)
    ]
    content.append({"type": "text", "text": template.replace("{prompt}", prompt)})
    messages = [{"role": "system", "content": options.system}] if options.system else []
    messages.append({"role": "user", "content": content})
    body = {"model": options.model, "messages": messages, "max_tokens": options.max_tokens, "temperature": options.temperature}
    body.update(options.extra_body)
    return body


def sampled_frames(video: Video, num_frames: int) -> np.ndarray:
    """`num_frames` evenly spaced frames (all of them when the video is shorter)."""
    count = min(num_frames, len(video.frames))
    return video.frames[np.linspace(0, len(video.frames) - 1, count).round().astype(int)]


def frame_data_urls(video: Video, options: JudgeOptions) -> list[str]:
    import imageio.v3 as iio

    mime = f"image/{options.image_format}"
    extra = {"quality": options.jpeg_quality} if options.image_format == "jpeg" else {}
    urls = []
    for frame in sampled_frames(video, options.num_frames):
        data = iio.imwrite("<bytes>", frame, extension=f".{options.image_format}", **extra)
        urls.append(f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}")
    return urls


def reply_text(raw: bytes) -> str:
    """`choices[0].message.content` of a chat-completions reply (text parts joined)."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise UnparseableReply(f"not a chat-completions reply ({type(exc).__name__}: {exc}): {_quote(raw)}") from exc
    if isinstance(content, list):  # content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise UnparseableReply(f"choices[0].message.content is {type(content).__name__}, not text")
    return content


def parse_scores(options: JudgeOptions, text: str, heads: tuple[str, ...], shared_template: bool) -> dict[str, float]:
    """Each head's score from one reply; UnparseableReply quoting the reply otherwise."""
    regex, field = options.score_regex, options.score_json
    if regex is None and field is None:
        if shared_template:
            field = "{head}"
        else:
            regex = FIRST_NUMBER
    out = {}
    for head in heads:
        if regex is not None:
            pattern = regex[head] if isinstance(regex, dict) else regex.replace("{head}", re.escape(head))
            value = _by_regex(pattern, text)
        else:
            path = field[head] if isinstance(field, dict) else field.replace("{head}", head)
            value = _by_json(path, text)
        if value is None or not math.isfinite(value):
            how = f"regex {pattern!r}" if regex is not None else f"JSON field {path!r}"
            raise UnparseableReply(f"no score for head {head} ({how}) in the reply {_quote(text)}")
        if options.score_range is not None and not options.score_range[0] <= value <= options.score_range[1]:
            raise UnparseableReply(f"head {head} score {value} is outside score_range {list(options.score_range)}: {_quote(text)}")
        out[head] = value
    return out


def _by_regex(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    if match is None:
        return None
    try:
        return float(match.group(1) if match.re.groups else match.group(0))
    except (TypeError, ValueError):
        return None


def _by_json(path: str, text: str) -> float | None:
    obj = _json_object(text)
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    if isinstance(obj, bool) or not isinstance(obj, (int, float, str)):
        return None
    try:
        return float(obj)
    except ValueError:
        return None


def _json_object(text: str):
    """The JSON object in a reply: the whole text, or the span from its first '{' to its last '}'."""
    stripped = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    for candidate in (stripped, stripped[stripped.find("{") : stripped.rfind("}") + 1]):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _quote(text: str | bytes, limit: int = 160) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
