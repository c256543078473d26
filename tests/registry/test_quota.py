"""Per-owner quota on unpublished blob bytes (issue 10 item 8), against a real `soppu-registry serve`.

Before the quota (commit 098ffad) one owner could store any amount of never-published bytes
(608 MiB in 8 s in the issue; 5 x 1 MiB all 201 when re-checked by hand). Now a PUT that would take
an owner past ``--max-unpublished-bytes`` is 413 ``quota_exceeded``: from the declared size
before the body is read, while streaming otherwise, and again at commit under the write lock.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from soppu_client.format import signing
from tests.registry.regkit import (
    REGISTRY_BIN,
    Server,
    auth,
    error_code,
    new_owner,
    publish,
    put_blob,
    upload_blobs,
)
from tests.registry.services import Backend

QUOTA = 10_000


@pytest.fixture
def server(tmp_path: Path, backend: Backend) -> Iterator[Server]:
    srv = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", "0",
                 "--max-unpublished-bytes", str(QUOTA), backend=backend).start()
    try:
        yield srv
    finally:
        srv.stop()
    log = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
    assert "Traceback" not in log, log[-3000:]


def quota_message(owner: str, used: int, hexd: str, size: int) -> str:
    return (f"owner {owner!r} has {used} bytes of unpublished blobs; storing sha256:{hexd} ({size} bytes) "
            f"would exceed the quota of {QUOTA} bytes (--max-unpublished-bytes). Publish versions listing "
            "the uploaded blobs, or wait for `soppu-registry gc` to remove uploads left unpublished past its grace period")


def send_headers(port: int, token: str, hexd: str, size: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall((f"PUT /v1/blobs/sha256:{hexd} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Length: {size}\r\n\r\n").encode())
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = json.loads(resp.read())
    sock.close()
    return resp.status, body


def gc(server: Server, grace: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REGISTRY_BIN), "gc", *server.storage_args(), "--grace", grace, "--json"],
                          capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **server.backend.env})


def test_quota_refuses_before_the_body_and_frees_on_publish_and_gc(server: Server, tmp_path: Path) -> None:
    store = server.storage()
    a = new_owner(store, "quota-a", tmp_path / "keys")
    b = new_owner(store, "quota-b", tmp_path / "keys")
    first = os.urandom(6000)
    first_hex = hashlib.sha256(first).hexdigest()
    # Control: under the quota, uploads work; re-sending an owned blob adds nothing.
    assert put_blob(server.url, a.write_token, first).status_code == 201
    assert put_blob(server.url, a.write_token, first).status_code == 200

    # Declared size over the room: refused from the headers alone (no body is ever sent).
    big = os.urandom(5000)
    big_hex = hashlib.sha256(big).hexdigest()
    status, body = read_answer(send_headers(server.port, a.write_token, big_hex, len(big)))
    assert (status, body) == (413, {"error": {"code": "quota_exceeded", "message": quota_message(a.name, 6000, big_hex, 5000)}})
    # No declared size (chunked): refused while streaming, nothing kept.
    r = requests.put(f"{server.url}/v1/blobs/sha256:{big_hex}", data=iter([big[:2000], big[2000:]]),
                     headers=auth(a.write_token), timeout=30)
    assert (r.status_code, error_code(r)) == (413, "quota_exceeded")
    assert store.blob_size(big_hex) is None and list(store.tmp_dir.iterdir()) == []
    # The quota is per owner: Bob is not affected by Alice's usage.
    assert put_blob(server.url, b.write_token, big).status_code == 201

    # Publishing frees the published bytes.
    bundle = a.bundle(tmp_path / "bundle", adapters=("q",))
    upload_blobs(server.url, a.write_token, bundle)
    bundle_bytes = sum(f["size"] for f in signing.read_signature(bundle)["statement"]["files"])
    third = os.urandom(QUOTA - 6000 - bundle_bytes + 1)
    third_hex = hashlib.sha256(third).hexdigest()
    r = put_blob(server.url, a.write_token, third)
    assert (r.status_code, r.json()["error"]["message"]) == (413, quota_message(a.name, 6000 + bundle_bytes, third_hex, len(third)))
    assert publish(server.url, a.write_token, a.name, "q", 1, signing.read_signature(bundle)).status_code == 201
    assert put_blob(server.url, a.write_token, third).status_code == 201

    # gc frees what it removes: both unpublished blobs go (past a 6 s grace period, in real time: S3
    # objects cannot be back-dated; Bob keeps his by a HEAD), then a near-quota upload fits.
    time.sleep(7.5)
    fourth = os.urandom(QUOTA - 10)
    assert put_blob(server.url, a.write_token, fourth).status_code == 413
    assert requests.head(f"{server.url}/v1/blobs/sha256:{big_hex}", headers=auth(b.write_token), timeout=10).status_code == 200
    proc = gc(server, "6s")
    assert sorted(json.loads(proc.stdout)["removed"]) == sorted([first_hex, third_hex]), proc.stderr
    assert store.blob_owners(first_hex) == set()
    assert put_blob(server.url, a.write_token, fourth).status_code == 201


def test_concurrent_uploads_cannot_pass_the_quota_together(server: Server, tmp_path: Path) -> None:
    store = server.storage()
    c = new_owner(store, "quota-c", tmp_path / "keys")
    blobs = [os.urandom(4000) for _ in range(6)]
    hexes = [hashlib.sha256(x).hexdigest() for x in blobs]
    # All six declare 4000 bytes while the owner uses 0: each passes the check made from the headers.
    socks = [send_headers(server.port, c.write_token, h, 4000) for h in hexes]
    time.sleep(1.0)
    for s, data in zip(socks, blobs):
        s.sendall(data)
    answers = [read_answer(s) for s in socks]
    assert sorted(st for st, _ in answers) == [201, 201, 413, 413, 413, 413]
    for (st, body), h in zip(answers, hexes):
        if st == 413:  # refused at commit: the usage it names is the two that got in first
            assert body == {"error": {"code": "quota_exceeded", "message": quota_message(c.name, 8000, h, 4000)}}
    assert store.unpublished_bytes(c.name) == 8000 <= QUOTA
    assert sum(store.blob_size(h) is not None for h in hexes) == 2 and list(store.tmp_dir.iterdir()) == []


def test_possession_claims_count_against_the_claimer(server: Server, tmp_path: Path) -> None:
    store = server.storage()
    d = new_owner(store, "quota-d", tmp_path / "keys")
    e = new_owner(store, "quota-e", tmp_path / "keys")
    data = os.urandom(6000)
    assert put_blob(server.url, d.write_token, data).status_code == 201
    assert put_blob(server.url, e.write_token, data).status_code == 200  # same bytes: claimed, not rewritten
    assert store.unpublished_bytes(d.name) == store.unpublished_bytes(e.name) == 6000
    r = put_blob(server.url, e.write_token, os.urandom(5000))
    assert (r.status_code, error_code(r)) == (413, "quota_exceeded")
    # gc releases E's stale claim (untouched past the grace period, in none of E's versions) and
    # keeps the blob, which D touched recently: E's quota is free again, D's is unchanged.
    with store.tx() as db:
        db.execute("UPDATE blob_owners SET touched_at = touched_at - 7200 WHERE owner = ?", (e.name,))
    proc = gc(server, "1h")
    report = json.loads(proc.stdout)
    assert (report["removed"], report["released_claims"]) == ([], 1), proc.stderr
    assert store.blob_owners(hashlib.sha256(data).hexdigest()) == {d.name}
    assert (store.unpublished_bytes(d.name), store.unpublished_bytes(e.name)) == (6000, 0)
    assert put_blob(server.url, e.write_token, os.urandom(5000)).status_code == 201
