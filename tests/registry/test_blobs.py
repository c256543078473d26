"""Blob uploads on a real server: digest, size and cap checked while streaming; half uploads leave nothing."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time

import requests

from soppu_client.format import signing
from soppu_client.registry_client import RegistryClient
from tests.registry.regkit import MAX_BLOB, Owner, Registry, auth, error_code, put_blob


def raw_put(port: int, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, dict]:
    """PUT over a bare socket; keep sending until the server answers or closes, then read its answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(head.encode() + b"\r\n")
    for c in chunks:
        try:
            sock.sendall(c)
        except (BrokenPipeError, ConnectionResetError):
            break
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    sock.close()
    return resp.status, json.loads(body)


def test_digest_mismatch_is_400_and_stores_nothing(registry: Registry, owner: Owner) -> None:
    data = os.urandom(1000)
    wrong = hashlib.sha256(b"something else").hexdigest()
    r = put_blob(registry.url, owner.write_token, data, wrong)
    assert (r.status_code, error_code(r)) == (400, "digest_mismatch")
    assert r.json()["error"]["message"] == f"blob sha256:{wrong}: body has sha256:{hashlib.sha256(data).hexdigest()}"
    assert requests.head(f"{registry.url}/v1/blobs/sha256:{wrong}", headers=auth(owner.write_token)).status_code == 404


def test_size_mismatch_is_400(registry: Registry, owner: Owner) -> None:
    data = os.urandom(1000)
    r = put_blob(registry.url, owner.write_token, data, **{"X-Soppu-Size": "999"})
    assert (r.status_code, error_code(r)) == (400, "size_mismatch")
    assert r.json()["error"]["message"] == "Content-Length 1000 differs from X-Soppu-Size 999"
    digest = hashlib.sha256(data).hexdigest()
    url = f"{registry.url}/v1/blobs/sha256:{digest}"
    # Chunked (no Content-Length): the declared size is checked while streaming.
    r = requests.put(url, data=iter([data[:500], data[500:]]), headers={**auth(owner.write_token), "X-Soppu-Size": "1001"})
    assert (r.status_code, error_code(r)) == (400, "size_mismatch")
    assert r.json()["error"]["message"] == f"blob sha256:{digest}: received 1000 bytes, declared 1001"
    r = requests.put(url, data=iter([data[:500], data[500:]]), headers={**auth(owner.write_token), "X-Soppu-Size": "999"})
    assert (r.status_code, error_code(r)) == (400, "size_mismatch")
    assert r.json()["error"]["message"] == f"blob sha256:{digest}: body is longer than the declared 999 bytes"
    assert requests.head(f"{registry.url}/v1/blobs/sha256:{digest}", headers=auth(owner.write_token)).status_code == 404
    r = put_blob(registry.url, owner.write_token, data, **{"X-Soppu-Size": "1000"})
    assert r.status_code == 201
    h = requests.head(f"{registry.url}/v1/blobs/sha256:{digest}", headers=auth(owner.write_token))
    assert h.status_code == 200 and h.headers["content-length"] == "1000"
    assert put_blob(registry.url, owner.write_token, data).status_code == 200  # idempotent


def test_oversize_body_is_413_declared_or_streamed(registry: Registry, owner: Owner) -> None:
    port = registry.server.port
    big = os.urandom(MAX_BLOB + 1)
    path = f"/v1/blobs/sha256:{hashlib.sha256(big).hexdigest()}"
    status, body = raw_put(port, path, {**auth(owner.write_token), "Content-Length": str(len(big))}, [])
    assert (status, body["error"]["code"]) == (413, "too_large")
    # Chunked: no length up front, so the cap is enforced while streaming.
    chunks = [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (big[i:i + 65536] for i in range(0, len(big), 65536))]
    status, body = raw_put(port, path, {**auth(owner.write_token), "Transfer-Encoding": "chunked"}, chunks + [b"0\r\n\r\n"])
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert requests.head(f"{registry.url}{path}", headers=auth(owner.write_token)).status_code == 404
    assert _tmp_files(registry) == []


def _tmp_files(registry: Registry, wait: float = 5.0) -> list[str]:
    deadline = time.monotonic() + wait
    while True:
        left = [p.name for p in registry.store.tmp_dir.iterdir()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


KILLED_CLIENT = r"""
import socket, sys, time
port, path, token, size = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.create_connection(("127.0.0.1", port))
s.sendall((f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
           f"Content-Length: {size}\r\n\r\n").encode() + b"\0" * (size // 2))
print("sent", flush=True)
time.sleep(60)
"""


def test_upload_killed_half_way_leaves_nothing_and_retry_succeeds(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1)
    st = signing.read_signature(bundle)["statement"]
    basis = next(f for f in st["files"] if f["path"] == "basis.safetensors")
    path = f"/v1/blobs/sha256:{basis['sha256']}"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(registry.server.port), path,
                             owner.write_token, str(basis["size"])], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"sent"
    proc.kill()
    proc.wait()
    assert _tmp_files(registry) == []
    assert requests.head(f"{registry.url}{path}", headers=auth(owner.write_token)).status_code == 404
    r = requests.put(f"{registry.url}/v1/adapters/{owner.name}/alpha/versions/1",
                     json={"signature": signing.read_signature(bundle)}, headers=auth(owner.write_token))
    assert (r.status_code, error_code(r)) == (400, "missing_blob")
    assert requests.get(f"{registry.url}/v1/adapters/{owner.name}/alpha", headers=auth(owner.read_token)).status_code == 404
    res = RegistryClient(registry.url, owner.write_token).upload_bundle(bundle)
    assert res.adapters == {"alpha": "created", "beta": "created"}
    got = RegistryClient(registry.url, owner.read_token).get_blob(basis["sha256"])
    assert got == (bundle / "basis.safetensors").read_bytes()


def test_blob_read_rules(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1)
    RegistryClient(registry.url, owner.write_token).upload_bundle(bundle)
    digest = signing.read_signature(bundle)["statement"]["files"][0]["sha256"]
    url = f"{registry.url}/v1/blobs/sha256:{digest}"
    other = registry.new_owner()
    assert requests.get(url, headers=auth(owner.read_token)).status_code == 200
    assert requests.get(url, headers=auth(owner.write_token)).status_code == 200
    assert requests.get(url, headers=auth(registry.serving_token)).status_code == 200
    r = requests.get(url, headers=auth(other.read_token))  # other owner: no version of theirs uses it
    assert (r.status_code, error_code(r)) == (404, "not_found")
    assert requests.get(url).status_code == 401
    stray = os.urandom(64)  # uploaded but referenced by no version: only its owner's tokens read it
    put_blob(registry.url, owner.write_token, stray)
    stray_url = f"{registry.url}/v1/blobs/sha256:{hashlib.sha256(stray).hexdigest()}"
    assert requests.get(stray_url, headers=auth(owner.read_token)).content == stray
    for token in (registry.serving_token, other.read_token, other.write_token):
        r = requests.get(stray_url, headers=auth(token))
        assert (r.status_code, error_code(r)) == (404, "not_found")
    r = requests.get(f"{registry.url}/v1/blobs/sha256:XYZ", headers=auth(owner.read_token))
    assert (r.status_code, error_code(r)) == (400, "bad_digest")
