"""POSTing JSON to a reward server with timeouts, bounded retries with backoff, and a bearer token.

Retried: connection errors, timeouts, HTTP 429 and 5xx (transient by nature). Not retried: other
4xx (the request itself is wrong) and replies that arrive but cannot be used (the same request
would get the same reply). Every failure ends as an `HttpRewardError` whose message is the reason
the video becomes an invalid reward.
"""

from __future__ import annotations

import os
import random
import threading
import time

import requests
from requests.adapters import HTTPAdapter

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class HttpRewardError(RuntimeError):
    """A request gave no usable reply; the message says why (and after how many attempts)."""


def bearer_headers(auth_token_env: str | None) -> dict[str, str]:
    """`Authorization: Bearer <token>` from the environment variable named `auth_token_env`."""
    if not auth_token_env:
        return {}
    token = os.environ.get(auth_token_env)
    if not token:
        raise ValueError(f"reward option auth_token_env names {auth_token_env!r}, but that environment variable is unset or empty")
    return {"Authorization": f"Bearer {token}"}


class HttpTransport:
    """One connection pool, shared by the threads that score a batch concurrently."""

    def __init__(
        self,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        max_attempts: int,
        backoff_s: float,
        backoff_max_s: float,
        headers: dict[str, str],
        pool_size: int,
    ) -> None:
        self.timeout = (connect_timeout_s, timeout_s)  # connect, then each wait for the server's bytes
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(headers)
        self._lock = threading.Lock()
        self.attempts = 0  # requests sent, retries included (read by metrics and tests)

    def post_json(self, url: str, body: bytes) -> bytes:
        return self._request("POST", url, body)

    def get_json(self, url: str) -> bytes:
        return self._request("GET", url, None)

    def _request(self, method: str, url: str, body: bytes | None) -> bytes:
        error, retry_after = "", None
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                time.sleep(self._delay(attempt - 1, retry_after))
            retry_after = None
            with self._lock:
                self.attempts += 1
            try:
                reply = self.session.request(
                    method, url, data=body, timeout=self.timeout,
                    headers={"Content-Type": "application/json"} if body is not None else None,
                )
            except requests.Timeout:
                error = f"no reply within {self.timeout[1]:g}s (timeout_s) from {url}"
                continue
            except requests.ConnectionError as exc:
                error = f"cannot connect to {url}: {_first_line(exc)}"
                continue
            if reply.status_code == 200:
                return reply.content
            error = f"HTTP {reply.status_code} from {url}: {_snippet(reply.text)}"
            if reply.status_code not in RETRY_STATUS:
                raise HttpRewardError(error)
            retry_after = _seconds(reply.headers.get("Retry-After"))
        raise HttpRewardError(f"{error} (gave up after {self.max_attempts} attempts)")

    def _delay(self, retry: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (so many clients do not retry in step), capped."""
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def close(self) -> None:
        self.session.close()


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: not worth parsing for a capped wait


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _first_line(exc: BaseException) -> str:
    return _snippet(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
