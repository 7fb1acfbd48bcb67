"""`reward.model: http`: a reward model that lives behind HTTP, in one of two dialects.

- `score`: a reward server speaking the plain scoring API of `http_schema.py` (e.g. any registered
  reward model run with `python -m reward_service.serve`). Videos go `batch_size` to a request.
- `openai_chat`: an OpenAI-compatible chat-completions VLM judge (`http_judge.py`): frames as
  images, a prompt template, the score parsed from the reply. One request per video (per head
  with per-head templates); the server batches concurrent requests itself.

Up to `concurrency` requests are in flight at once. A request that fails for good (timeouts,
connection errors or 5xx past `max_attempts`, another 4xx, an unusable or wrongly sized reply)
leaves its videos NaN in every head, with the reason in `last_errors`, so the reward pool marks
exactly those videos invalid (`unscored: http: <reason>`) and the run goes on.

The pool kills a reward actor whose batch outlasts its own `timeout_s` (reward.timeout_s): keep
max_attempts x (timeout_s + backoff_max_s) x ceil(batch / (batch_size x concurrency)) below it.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reward_service.base import RewardModel, Video
from reward_service.http_judge import JudgeOptions, UnparseableReply, parse_scores, reply_text, request_body
from reward_service.http_schema import ScoreRequest, ScoreResponse, ServerInfo, encode_video
from reward_service.http_transport import HttpRewardError, HttpTransport, bearer_headers

log = logging.getLogger(__name__)


class HttpRewardOptions(BaseModel):
    """`reward.options` of `reward.model: http`."""

    model_config = ConfigDict(extra="forbid")

    # `score`: the server's base URL (POST {url}/score). `openai_chat`: the API base, e.g.
    # http://host:8000/v1 (POST {url}/chat/completions).
    url: str
    dialect: Literal["score", "openai_chat"] = "score"
    # `score`: the heads to read (default: the server's, from GET {url}/info).
    # `openai_chat`: the heads the template rates (default ["score"], or the template dict's keys).
    heads: list[str] | None = None
    name: str = "http"  # the reward's name in reasons and logs
    batch_size: int = Field(8, ge=1)  # videos per request (`score`)
    concurrency: int = Field(4, ge=1)  # requests in flight
    timeout_s: float = Field(60.0, gt=0)  # waiting for the server's reply, per attempt
    connect_timeout_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=10)
    backoff_s: float = Field(0.5, ge=0)  # first retry's wait; doubled each retry, with jitter
    backoff_max_s: float = Field(8.0, ge=0)
    auth_token_env: str | None = None  # environment variable holding a bearer token
    video_format: Literal["frames", "mp4"] = "frames"  # `score`: exact raw frames, or a (lossy) MP4
    judge: JudgeOptions | None = None  # `openai_chat` only

    @model_validator(mode="after")
    def _dialect_fits(self) -> HttpRewardOptions:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if (self.dialect == "openai_chat") != (self.judge is not None):
            raise ValueError("the judge options are required by dialect 'openai_chat' and only allowed with it")
        if self.heads is not None and (not self.heads or len(set(self.heads)) != len(self.heads)):
            raise ValueError(f"heads must be distinct and non-empty, got {self.heads}")
        return self


class HttpReward(RewardModel):
    """See the module docstring; built by `build_reward("http", **options)`."""

    def __init__(self, **options) -> None:
        try:
            self.options = HttpRewardOptions(**options)
        except ValidationError as exc:
            raise ValueError(f"invalid options for reward 'http': {exc}") from exc
        o = self.options
        self.name = o.name
        self.url = o.url.rstrip("/")
        self.transport = HttpTransport(
            timeout_s=o.timeout_s, connect_timeout_s=o.connect_timeout_s, max_attempts=o.max_attempts,
            backoff_s=o.backoff_s, backoff_max_s=o.backoff_max_s, headers=bearer_headers(o.auth_token_env),
            pool_size=o.concurrency,
        )
        if o.judge is not None:
            self.heads = o.judge.heads(o.heads)
            o.judge.check_heads(self.heads)
        else:
            self.heads = tuple(o.heads) if o.heads is not None else self._server_heads()
        self.last_errors: dict[int, str] = {}

    def _server_heads(self) -> tuple[str, ...]:
        try:
            info = ServerInfo.model_validate_json(self.transport.get_json(f"{self.url}/info"))
        except (HttpRewardError, ValidationError) as exc:
            raise RuntimeError(
                f"reward 'http': cannot read the heads from {self.url}/info ({exc}); "
                "is the server up? (or set reward.options.heads)"
            ) from exc
        return tuple(info.heads)

    def score(self, videos: list[Video], prompts: list[str]) -> dict[str, np.ndarray]:
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        out = {head: np.full(len(videos), np.nan) for head in self.heads}
        errors: dict[int, str] = {}
        tasks = self._judge_tasks(videos, prompts) if self.options.judge else self._score_tasks(videos, prompts)
        with ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="http-reward") as pool:
            for indices, future in [(idx, pool.submit(task)) for idx, task in tasks]:
                try:
                    values, reasons = future.result()
                except (HttpRewardError, UnparseableReply) as exc:
                    values, reasons = {}, {i: str(exc) for i in range(len(indices))}
                for head, column in values.items():
                    out[head][indices] = column
                for local, reason in reasons.items():
                    errors.setdefault(indices[local], reason)
        for i in errors:  # a video with any failed part is unscored in every head
            for head in self.heads:
                out[head][i] = np.nan
        if errors:
            log.warning("reward %s: %d of %d videos unscored; first: %s", self.name, len(errors), len(videos), next(iter(errors.values())))
        self.last_errors = dict(sorted(errors.items()))
        return out

    # Each task scores some of the videos and returns ({head: values for those videos}, {their local index: reason}).
    def _score_tasks(self, videos, prompts):
        size = self.options.batch_size
        return [
            (list(range(start, min(start + size, len(videos)))), partial(self._score_batch, videos[start : start + size], prompts[start : start + size]))
            for start in range(0, len(videos), size)
        ]

    def _score_batch(self, videos: list[Video], prompts: list[str]):
        request = ScoreRequest(prompts=list(prompts), videos=[encode_video(v, self.options.video_format) for v in videos])
        raw = self.transport.post_json(f"{self.url}/score", request.model_dump_json().encode())
        try:
            reply = ScoreResponse.model_validate_json(raw)
        except ValidationError as exc:
            raise HttpRewardError(f"unusable reply from {self.url}/score: {_errors(exc)}; body {_quote(raw)}") from exc
        if len(reply) != len(videos):
            raise HttpRewardError(f"{self.url}/score returned {len(reply)} scores for {len(videos)} videos")
        missing = [h for h in self.heads if h not in reply.scores]
        if missing:
            raise HttpRewardError(f"{self.url}/score returned no head {missing} (got {reply.heads})")
        values = {h: np.array([np.nan if v is None else v for v in reply.scores[h]], dtype=np.float64) for h in self.heads}
        reasons = {i: f"server: {e}" for i, e in enumerate(reply.errors or []) if e}
        return values, reasons

    def _judge_tasks(self, videos, prompts):
        judge, tasks = self.options.judge, []
        for i, (video, prompt) in enumerate(zip(videos, prompts)):
            for template, heads in judge.requests_for(self.heads):
                tasks.append(([i], partial(self._judge_one, video, prompt, template, heads)))
        return tasks

    def _judge_one(self, video: Video, prompt: str, template: str, heads: tuple[str, ...]):
        judge = self.options.judge
        body = request_body(judge, video, prompt, template)
        raw = self.transport.post_json(f"{self.url}/chat/completions", json.dumps(body).encode())
        scores = parse_scores(judge, reply_text(raw), heads, shared_template=not isinstance(judge.template, dict))
        return {h: np.array([v]) for h, v in scores.items()}, {}

    def close(self) -> None:
        self.transport.close()


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])


def _quote(raw: bytes, limit: int = 160) -> str:
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
