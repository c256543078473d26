"""A counting proxy for the serving tests: a real HTTP/1.1 keep-alive server on 127.0.0.1 in a
thread, in front of a real ``soppu-registry serve`` process. It counts, server-side, the TCP
connections it accepted and the requests it answered (method, path), so a test sees how many
connections and requests one serving request really cost."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a pooled client reuses the connection
    server: _Server

    def do_GET(self) -> None:
        self._proxy("GET")

    def do_HEAD(self) -> None:
        self._proxy("HEAD")

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _proxy(self, method: str) -> None:
        counter = self.server.counter
        with counter.lock:
            counter.requests.append((method, self.path))
        headers = {k: v for k, v in self.headers.items() if k.lower() == "authorization"}
        r = counter.upstream_session.request(method, counter.upstream + self.path, headers=headers, timeout=30)
        self.send_response(r.status_code)
        for name in ("Content-Type", "X-Soppu-Error-Code"):
            if name in r.headers:
                self.send_header(name, r.headers[name])
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(r.content)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    counter: Counting

    def get_request(self) -> Any:
        conn = super().get_request()
        with self.counter.lock:
            self.counter.connections += 1
        return conn


class Counting:
    """The proxy; ``url`` is what the serving host is told; ``connections`` and ``requests`` count."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.upstream_session = requests.Session()
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, str]] = []
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.counter = self
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def snapshot(self) -> tuple[int, int]:
        """(connections accepted, requests answered) so far."""
        with self.lock:
            return self.connections, len(self.requests)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self.upstream_session.close()

    def __enter__(self) -> Counting:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
