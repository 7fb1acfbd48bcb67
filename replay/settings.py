"""The `replay` section of the run configuration: where the replay store lives and how much it holds.

`redact_secrets` lives here because a store URL is where a password can hide; the run's records
(config.yaml, run.log, metrics, trackers) redact with it too.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, StrictBool, field_validator

from policy.settings_types import Int, Section

# `scheme://user:password@host` (the user may be empty, as in redis://:password@host).
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<secret>[^@/\s]+)@")
REDACTED = "***"


def redact_secrets(text: str) -> str:
    """`text` with every password given inside a URL replaced by ***."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)


class ReplaySettings(Section):
    url: str | None = None  # None: an embedded local store under the output directory
    max_queue_groups: Int = Field(256, ge=1)
    buffer_groups: Int = Field(100, ge=1)  # semi-on-policy reference buffer size
    import_buffer: Path | None = None  # reuse an exported reference buffer instead of collecting one
    export_buffer: StrictBool = True

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str | None) -> str | None:
        # Checked here so that a mistyped URL is reported redacted, before any process opens it.
        scheme = url.split("://", 1)[0].lower() if url and "://" in url else ""
        if scheme not in ("", "redis", "rediss", "file"):
            raise ValueError(f"unknown scheme {scheme!r} in {redact_secrets(url)}; use redis://, rediss:// or file://")
        return url
