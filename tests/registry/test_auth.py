"""Token scopes, revocation, the per-token rate limit, and the client's retry behaviour."""

from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from soppu_client.format import signing
from soppu_client.format.errors import RegistryError
from soppu_client.registry_client import RegistryClient
from soppu_registry.auth import issue_token
from soppu_registry.storage import Storage
from tests.registry.regkit import (
    BASE_MODEL,
    Owner,
    Registry,
    Server,
    auth,
    error_code,
    free_port,
    new_owner,
    put_blob,
    upload_blobs,
)
from tests.registry.services import Backend


def test_each_scope(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1)
    doc = signing.read_signature(bundle)
    other = registry.new_owner()
    url = registry.url
    blob = b"scope test " + owner.name.encode()
    # No token / bad token: 401.
    assert error_code(put_blob(url, None, blob)) == "unauthorized"
    assert put_blob(url, None, blob).status_code == 401
    assert put_blob(url, "soppu_0000000000000000_bogus", blob).status_code == 401
    assert requests.get(f"{url}/v1/adapters/{owner.name}/alpha").status_code == 401
    # Read and serving tokens cannot write.
    for token in (owner.read_token, registry.serving_token):
        r = put_blob(url, token, blob)
        assert (r.status_code, error_code(r)) == (403, "forbidden")
    upload_blobs(url, owner.write_token, bundle)
    for token in (owner.read_token, registry.serving_token, other.write_token):
        r = requests.put(f"{url}/v1/adapters/{owner.name}/alpha/versions/1", json={"signature": doc}, headers=auth(token))
        assert (r.status_code, error_code(r)) == (403, "forbidden")
    r = requests.put(f"{url}/v1/adapters/{owner.name}/alpha/versions/1", json={"signature": doc}, headers=auth(owner.write_token))
    assert r.status_code == 201
    # Private by default: the owner's tokens and serving tokens read; another owner does not.
    for token in (owner.read_token, owner.write_token, registry.serving_token):
        assert requests.get(f"{url}/v1/adapters/{owner.name}/alpha", headers=auth(token)).status_code == 200
    r = requests.get(f"{url}/v1/adapters/{owner.name}/alpha", headers=auth(other.read_token))
    assert (r.status_code, error_code(r)) == (403, "forbidden")
    bases = requests.get(f"{url}/v1/bases/{BASE_MODEL}", headers=auth(other.read_token)).json()["bases"]
    assert all(u["owner"] != owner.name for b in bases for u in b["used_by"])
    # Revocation takes effect on the next request (admin writes the same SQLite file).
    token_id = owner.read_token.split("_")[1]
    registry.store.revoke_token(token_id)
    r = requests.get(f"{url}/v1/adapters/{owner.name}/alpha", headers=auth(owner.read_token))
    assert (r.status_code, error_code(r)) == (401, "unauthorized")
    assert r.json()["error"]["message"] == f"token {token_id} was revoked"


def test_unknown_route_and_bad_version_use_the_error_shape(registry: Registry, owner: Owner) -> None:
    r = requests.get(f"{registry.url}/v2/nothing", headers=auth(owner.read_token))
    assert (r.status_code, error_code(r)) == (404, "not_found")
    r = requests.get(f"{registry.url}/v1/adapters/{owner.name}/alpha/versions/x", headers=auth(owner.read_token))
    assert (r.status_code, error_code(r)) == (400, "bad_request")
    doc = requests.get(f"{registry.url}/openapi.json").json()
    assert doc["info"]["title"] == "SOPPU registry"
    assert doc["components"]["securitySchemes"] == {"token": {
        "type": "http", "scheme": "bearer", "description": "`soppu_<id>_<secret>` from `soppu-registry issue-token`"}}
    ops = {(m.upper(), path): op for path, item in doc["paths"].items() for m, op in item.items()}
    assert sorted(ops) == sorted([("GET", "/healthz"), ("PUT", "/v1/blobs/{digest}"), ("HEAD", "/v1/blobs/{digest}"),
                                  ("GET", "/v1/blobs/{digest}"), ("PUT", "/v1/adapters/{owner}/{name}/versions/{version}"),
                                  ("GET", "/v1/adapters/{owner}/{name}"), ("GET", "/v1/adapters/{owner}/{name}/versions"),
                                  ("GET", "/v1/adapters/{owner}/{name}/versions/{version}"), ("GET", "/v1/keys/{owner}"),
                                  ("GET", "/v1/bases/{base_model}"), ("PUT", "/v1/bundles/{owner}/versions/{version}"),
                                  ("GET", "/v1/signatures/{digest}")])
    assert [k for k, op in ops.items() if op.get("security") != [{"token": []}]] == [("GET", "/healthz")]


def test_path_is_checked_before_the_token_and_the_token_before_the_body(registry: Registry, owner: Owner) -> None:
    url = registry.url
    r = requests.head(f"{url}/v1/blobs/sha256:XYZ")  # no token, bad digest: the path answers first
    assert (r.status_code, r.headers["X-Soppu-Error-Code"]) == (400, "bad_digest")
    r = requests.get(f"{url}/v1/adapters/bad owner!/alpha")
    assert (r.status_code, error_code(r)) == (400, "bad_owner")
    r = requests.get(f"{url}/v1/keys/{owner.name}", headers=auth("soppu_0000000000000000_bogus"))
    assert (r.status_code, error_code(r), r.json()["error"]["message"]) == (401, "unauthorized", "invalid token")
    # A caller that may not publish is answered before its body is read: headers only, then the answer.
    for token, want in ((None, (401, "unauthorized")), (owner.read_token, (403, "forbidden"))):
        conn = http.client.HTTPConnection("127.0.0.1", registry.server.port, timeout=10)
        conn.putrequest("PUT", f"/v1/adapters/{owner.name}/alpha/versions/1")
        for k, v in {**auth(token), "Content-Type": "application/json", "Content-Length": str(16 << 20)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())["error"]["code"]) == want
        conn.close()
    r = requests.put(f"{url}/v1/adapters/{owner.name}/alpha/versions/-1", json={}, headers=auth(owner.write_token))
    assert (r.status_code, error_code(r)) == (400, "bad_request")
    assert r.json()["error"]["message"] == "version must be an integer from 1 to 9223372036854775807 in ASCII digits, got '-1'"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> tuple[Server, Storage]:
    tmp = tmp_path_factory.mktemp("limited")
    server = Server(tmp / "data", "--rate", "4", "--burst", "3", backend=backend).start()
    yield server, server.storage()
    server.stop()


def test_rate_limit_is_429_with_retry_after_per_token(limited: tuple[Server, Storage]) -> None:
    server, store = limited
    store.create_owner("rl")
    _, t1 = issue_token(store, "rl", ["owner-read"])
    _, t2 = issue_token(store, "rl", ["owner-read"])
    codes = [requests.get(f"{server.url}/v1/keys/rl", headers=auth(t1)).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[-1] == 429
    r = requests.get(f"{server.url}/v1/keys/rl", headers=auth(t1))
    assert (r.status_code, error_code(r)) == (429, "rate_limited") and int(r.headers["Retry-After"]) >= 1
    assert requests.get(f"{server.url}/v1/keys/rl", headers=auth(t2)).status_code == 200  # own bucket


def test_client_honours_retry_after_and_uploads_through_the_limit(limited: tuple[Server, Storage], tmp_path: Path) -> None:
    server, store = limited
    o = new_owner(store, "rl2", tmp_path)
    bundle = o.bundle(tmp_path / "b", 1)
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        time.sleep(s)

    client = RegistryClient(server.url, o.write_token, retries=10, sleep=sleep)
    res = client.upload_bundle(bundle)  # 4 HEAD + 4 PUT + 2 publish > burst 3
    assert res.adapters == {"alpha": "created", "beta": "created"}
    assert client.retried > 0 and all(w >= 1 for w in waits)  # waited what Retry-After said


class _Flaky(BaseHTTPRequestHandler):
    failures = 2
    seen = 0

    def do_GET(self) -> None:
        type(self).seen += 1
        if type(self).seen <= self.failures:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b'{"owner": "x", "keys": []}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_client_retries_5xx_then_succeeds_and_gives_up_on_dead_registry() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = RegistryClient(f"http://127.0.0.1:{httpd.server_port}", "t", retries=3, sleep=lambda s: None)
        assert client.get_keys("x") == [] and client.retried == 2
    finally:
        httpd.shutdown()
    dead = f"http://127.0.0.1:{free_port()}"
    client = RegistryClient(dead, "t", retries=2, sleep=lambda s: None)
    with pytest.raises(RegistryError) as e:
        client.get_keys("x")
    assert e.value.status is None and e.value.url == f"{dead}/v1/keys/x" and client.retried == 2
    assert "cannot reach the registry after 3 attempts" in str(e.value)
