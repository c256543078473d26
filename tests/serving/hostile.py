"""A malicious registry for the serving tests: a real HTTP server on 127.0.0.1 in a thread.

It proxies every request to a real ``soppu-registry serve`` process (the token passed through),
except the paths a test gives a rule for: then it answers what the rule writes -- an old record
(a rollback), another key, bad or huge JSON, a blob trickled byte by byte. ``sent[path]`` counts
the body bytes a rule got out before the client hung up.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

Rule = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection; a body without length ends at close
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _serve(self, method: str) -> None:
        hostile = self.server.hostile
        bare = self.bare = self.path.split("?", 1)[0]  # rules, `seen`, `sent` name paths; a query goes upstream
        hostile.seen.append((method, bare))
        rule = hostile.rules.get(self.path) or hostile.rules.get(bare)
        try:
            if rule is not None:
                rule(self)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() == "authorization"}
            r = requests.request(method, hostile.upstream + self.path, headers=headers, timeout=30)
            self.send_response(r.status_code)
            for name in ("Content-Type", "X-Soppu-Error-Code"):
                if name in r.headers:
                    self.send_header(name, r.headers[name])
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(r.content)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- what rules write ---------------------------------------------------------------------
    def answer(self, body: bytes, *, status: int = 200, headers: dict[str, str] | None = None,
               length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write(body)

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        path = getattr(self, "bare", self.path)
        self.server.hostile.sent[path] = self.server.hostile.sent.get(path, 0) + len(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hostile: Hostile


class Hostile:
    """The malicious registry in front of ``upstream``; ``url`` is what the serving host is told."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.rules: dict[str, Rule] = {}
        self.sent: dict[str, int] = {}
        self.seen: list[tuple[str, str]] = []
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hostile = self
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Hostile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- rules ----------------------------------------------------------------------------------------

def json_answer(doc: Any, status: int = 200) -> Rule:
    """Answer ``doc`` as JSON with its length."""
    return lambda h: h.answer(json.dumps(doc).encode(), status=status)


def raw_answer(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Rule:
    return lambda h: h.answer(body, status=status, headers=headers)


def endless_json(total: int, *, declare: bool, status: int = 200) -> Rule:
    """A JSON object of ``total`` bytes, written 64 KiB at a time until the client hangs up
    (``declare``: with that Content-Length; else the body just ends at close)."""
    def rule(h: _Handler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        if declare:
            h.send_header("Content-Length", str(total))
        h.end_headers()
        chunk = b" " * (64 << 10)
        h._write(b'{"pad": "')
        for _ in range(total // len(chunk)):
            h._write(chunk)
        h._write(b'"}')
    return rule


def trickle(body: bytes, every: float) -> Rule:
    """Declare the whole of ``body`` then send it one byte every ``every`` seconds."""
    def rule(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(len(body)):
            h._write(body[i:i + 1])
            time.sleep(every)
    return rule
