"""A loopback HTTP server serving fixed bodies by path, counting hits: a fake vendor service."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeHttp:
    """``routes`` maps a path with query (``/vcek/v1/Milan/ab..?blSPL=..``) to a body, or to a
    body and response headers."""

    def __init__(
        self, routes: Mapping[str, bytes | tuple[bytes, dict[str, str]]] | None = None
    ) -> None:
        self.routes: dict[str, bytes | tuple[bytes, dict[str, str]]] = dict(routes or {})
        self.hits: Counter[str] = Counter()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.hits[self.path] += 1
                route = fake.routes.get(self.path)
                body, headers = route if isinstance(route, tuple) else (route, {})
                self.send_response(200 if body is not None else 404)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHttp:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
