"""Replay: the `CandidateGroup` record, its Arrow codec, and the Redis and local-file stores.

    store = replay.open_store("redis://127.0.0.1:6379/0?prefix=run1:")   # or "file:///path", or None
    store.push(group)                                   # rollout worker
    for d in store.pull(4, consumer="learner-0", block_ms=1000):
        ...update...
        store.ack(d)                                    # after the update that used it
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from replay.codec import CorruptRecordError, UnsupportedSchemaError, decode, encode
from replay.record import SCHEMA_VERSION, CandidateGroup
from replay.store import (
    Delivery,
    ReplayError,
    ReplayFullError,
    ReplayStats,
    ReplayStore,
    ReplayUnavailableError,
    StoreLostError,
    StoreOptions,
    min_policy_version,
)

DEFAULT_DIR = "runs/replay"
PASSWORD_ENV = "ARCOPO_REDIS_PASSWORD"
URL_ENV = "ARCOPO_REPLAY_URL"
# Query parameters of a redis:// URL passed to the connection rather than to StoreOptions.
CONNECTION_PARAMS = {
    "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname", "client_name",
}

__all__ = [
    "CandidateGroup",
    "CorruptRecordError",
    "Delivery",
    "ReplayError",
    "ReplayFullError",
    "ReplayStats",
    "ReplayStore",
    "ReplayUnavailableError",
    "SCHEMA_VERSION",
    "StoreLostError",
    "StoreOptions",
    "UnsupportedSchemaError",
    "decode",
    "encode",
    "min_policy_version",
    "open_store",
    "with_store_option",
    "redis_connection",
]


def with_store_option(url: str, name: str, value: Any) -> str:
    """`url` with the store option `name=value` in its query (replacing one already there)."""
    if name not in StoreOptions.model_fields:
        raise ValueError(f"unknown replay store option {name!r}; known: {sorted(StoreOptions.model_fields)}")
    url = os.fspath(url)
    if urlsplit(url).scheme == "":  # a plain directory: as a file URL, so the query cannot become part of the path
        url = Path(url).resolve().as_uri()
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name] + [(name, str(value))]
    return urlunsplit(parts._replace(query=urlencode(query)))


def open_store(url: str | os.PathLike | None = None, **options: Any) -> ReplayStore:
    """Open the store a URL names; keyword options override the URL's query parameters.

    - `redis://[user:password@]host:port/db?prefix=...&max_queue_len=...` (`rediss://` for TLS). The
      password comes from the URL or else from the ARCOPO_REDIS_PASSWORD environment variable.
    - `file:///absolute/dir`, `file://relative/dir` or a plain path: the embedded local store.
    - None: $ARCOPO_REPLAY_URL if set, else a local store in `runs/replay`.
    Option names are `StoreOptions` fields; an unknown one raises ValueError naming it.
    """
    if url is None:
        url = os.environ.get(URL_ENV) or DEFAULT_DIR
    url = os.fspath(url)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if parts.scheme in ("redis", "rediss"):
        return _open_redis(url, options)
    if parts.scheme in ("file", ""):
        from replay.local_store import LocalStore

        path = url if parts.scheme == "" else unquote(parts.netloc + parts.path)
        if not path:
            raise ValueError(f"replay store URL {url!r} names no directory")
        return LocalStore(Path(path), _options({**query, **options}, url))
    raise ValueError(f"unknown replay store URL scheme {parts.scheme!r} in {url!r}; use redis://, rediss:// or file://")


def _options(values: dict[str, Any], url: str) -> StoreOptions:
    unknown = sorted(set(values) - set(StoreOptions.model_fields))
    if unknown:
        known = sorted(StoreOptions.model_fields)
        raise ValueError(f"unknown replay store option(s) {unknown} for {url!r}; known: {known}")
    return StoreOptions(**values)


def redis_connection(url: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Split a redis:// or rediss:// URL into redis-py connection keywords and store option values."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL: {parts.scheme}://...")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    connection: dict[str, Any] = {k: query.pop(k) for k in list(query) if k in CONNECTION_PARAMS}
    if "ssl_check_hostname" in connection:
        connection["ssl_check_hostname"] = connection["ssl_check_hostname"].lower() in ("1", "true", "yes")
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit():
        raise ValueError(f"Redis URL path must be a database number, got {parts.path!r}")
    connection.update(host=parts.hostname or "localhost", port=parts.port or 6379, db=int(db_text))
    if parts.username:
        connection["username"] = unquote(parts.username)
    password = unquote(parts.password) if parts.password else os.environ.get(PASSWORD_ENV)
    if password:
        connection["password"] = password
    if parts.scheme == "rediss":
        connection["ssl"] = True
    return connection, query


def _open_redis(url: str, options: dict[str, Any]) -> ReplayStore:
    from replay.redis_store import RedisStore

    connection, query = redis_connection(url)
    safe_url = f"{urlsplit(url).scheme}://{connection['host']}:{connection['port']}/{connection['db']}"
    return RedisStore(connection, _options({**query, **options}, safe_url))
