"""`soppu generate` through the real lorax-client against a loopback HTTP endpoint speaking LoRAX's
streaming wire format (POST / with ``"stream": true``, server-sent events) (the router's wire format; no GPU server is available here)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from soppu_client.cli.generate import generate

TOKENS = ["Hello", ",", " world"]


class _Router(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Router.requests.append({"path": self.path, "body": body})
        if body["parameters"].get("api_token") != "good":
            payload = json.dumps({"error": "soppu adapter alice/ad0: the registry rejected the token",
                                  "error_type": "generation"}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i, text in enumerate(TOKENS):
            last = i == len(TOKENS) - 1
            event = {"token": {"id": i, "text": text, "logprob": -0.1, "special": False},
                     "generated_text": "".join(TOKENS) if last else None,
                     "details": {"finish_reason": "length", "prompt_tokens": 2, "generated_tokens": 3} if last else None}
            self.wfile.write(f"data:{json.dumps(event)}\n\n".encode())
            self.wfile.flush()


@pytest.fixture
def router() -> Iterator[str]:
    _Router.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Router)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_streams_tokens_without_naming_the_source(router: str) -> None:
    result = CliRunner().invoke(generate, ["--server", router, "--adapter", "alice/ad0@2", "--token", "good",
                                           "--max-new-tokens", "3", "Say hi"])
    assert result.exit_code == 0, result.output
    assert result.output == "Hello, world\n"
    (req,) = _Router.requests
    assert req["path"] == "/"  # lorax-client posts {"stream": true} to the router's compat route
    params = req["body"]["parameters"]
    assert req["body"]["inputs"] == "Say hi" and req["body"]["stream"] is True
    assert params["adapter_id"] == "alice/ad0@2" and params["api_token"] == "good"
    assert params.get("adapter_source") is None  # the server's --default-adapter-source soppu applies
    assert params["max_new_tokens"] == 3


def test_json_output_and_server_errors(router: str) -> None:
    ok = CliRunner().invoke(generate, ["--server", router, "--adapter", "alice/ad0", "--token", "good", "--json", "x"])
    assert ok.exit_code == 0
    assert json.loads(ok.output) == {"ok": True, "server": router, "adapter": "alice/ad0",
                                     "generated_text": "Hello, world", "generated_tokens": 3,
                                     "finish_reason": "length"}
    bad = CliRunner().invoke(generate, ["--server", router, "--adapter", "alice/ad0", "--token", "bad", "x"])
    assert bad.exit_code == 1
    assert "error: LoRAX at " in bad.output and "the registry rejected the token" in bad.output
    usage = CliRunner().invoke(generate, ["--server", router, "--adapter", "no-owner", "x"])
    assert usage.exit_code == 2 and "must look like `owner/name` or `owner/name@version`" in usage.output
