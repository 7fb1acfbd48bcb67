"""A real HTTP server on 127.0.0.1 (stdlib, one thread per connection) whose replies a test scripts.

`reply(request) -> (status, body, delay_s)` decides each reply; every request is recorded (path,
headers, parsed JSON body), so tests check what the client sent as well as how it copes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: object  # parsed JSON, or None


@dataclass
class LocalServer:
    reply: Callable[[Received], tuple[int, bytes, float]]
    received: list[Received] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Received(self.command, self.path, dict(self.headers), json.loads(raw) if raw else None)
                server.received.append(request)
                status, body, delay = server.reply(request)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test)

            do_GET = do_POST = _handle

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def posts(self, path: str) -> list[Received]:
        return [r for r in self.received if r.method == "POST" and r.path == path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def json_reply(obj, status: int = 200, delay: float = 0.0) -> tuple[int, bytes, float]:
    return status, json.dumps(obj).encode(), delay
