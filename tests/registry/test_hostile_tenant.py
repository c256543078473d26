"""Issue 19, retried the way each finding was found, against real `soppu-registry serve` processes
on both backends: a hostile tenant with an owner-write token, or an anonymous client.

1. the JSON depth pre-scan was quadratic (a 32 KiB publish body of escaped quotes: 5.6 s; at the
   1 MiB cap about 1.6 h), on publish bodies and on manifest.json blobs;
3. a signature whose unused base64 bits were flipped still published;
5. a batch-published adapter `evil\\n` and a version `1\\n` were accepted;
6. files listed in a manifest outside the bundle format were published, and so left the
   unpublished quota for good (28 MiB kept against an 8 MiB quota);
7. uploads answered 401/429 before their body was read logged a traceback each;
8. one adapter could make every host materialize any number of parameters up to the rank cap.

The scan's linear growth itself is timed as a ratio in test_json_scan.py; here a request at the
cap must be answered within a client timeout far below the old running time (1 MiB: ~1.6 h).
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from soppu_client.format import signing
from soppu_client.format.names import METRICS
from tests.registry.regkit import (
    MAX_BLOB,
    FUTURE,
    Owner,
    Registry,
    Server,
    auth,
    error_code,
    make_bundle,
    new_owner,
    publish,
    put_blob,
    upload_blobs,
)
from tests.registry.services import Backend

PROMPT = 60  # seconds a client waits: the old scan took ~1.6 h on the 1 MiB bodies below
KiB = 1 << 10


def batch(url: str, token: str, owner: str, version: str | int, doc: dict[str, Any]) -> requests.Response:
    return requests.put(f"{url}/v1/bundles/{owner}/versions/{version}", json={"signature": doc},
                        headers=auth(token), timeout=30)


def resign(owner: Owner, st: dict[str, Any], changes: dict[str, bytes]) -> dict[str, Any]:
    """``st`` with the files in ``changes`` replaced by those bytes (sha256 and size), signed by ``owner``."""
    files = [dict(f) for f in st["files"] if f["path"] not in changes]
    files += [{"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for p, b in changes.items()]
    return signing.sign_statement({**st, "files": sorted(files, key=lambda f: f["path"])}, owner.key)


# --------------------------------------------------------------------------- finding 1


def _escaped_quotes(n: int) -> bytes:
    """An unterminated JSON string of escaped quotes, ``n`` bytes: the old scan's worst case."""
    return b'"' + b'\\"' * ((n - 1) // 2)


def test_hostile_publish_body_at_the_cap_is_refused_promptly(registry: Registry, owner: Owner) -> None:
    body = b'{"signature": ' + _escaped_quotes((1 << 20) - 64)
    assert len(body) <= 1 << 20  # under --max-publish-bytes: the scan, not the size cap, answers
    other = registry.new_owner()
    r = requests.put(f"{registry.url}/v1/adapters/{owner.name}/alpha/versions/1", data=body,
                     headers={**auth(owner.write_token), "content-type": "application/json"}, timeout=PROMPT)
    assert (r.status_code, error_code(r)) == (400, "bad_request"), r.text
    assert r.json()["error"]["message"].startswith("publish body is not JSON")
    # Deep nesting and long escapes are refused as fast, and another tenant is served meanwhile.
    for hostile in (b"[" * ((1 << 20) - 64), b'{"signature": "' + b"\\\\" * ((1 << 19) - 64)):
        r = requests.put(f"{registry.url}/v1/bundles/{owner.name}/versions/1", data=hostile,
                         headers=auth(owner.write_token), timeout=PROMPT)
        assert r.status_code == 400, r.text
    assert requests.get(f"{registry.url}/v1/keys/{other.name}", headers=auth(other.read_token),
                        timeout=PROMPT).status_code == 200


def test_hostile_manifest_blob_is_refused_promptly(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1, adapters=("alpha",))
    upload_blobs(registry.url, owner.write_token, bundle)
    hostile = _escaped_quotes(MAX_BLOB - 64)
    assert put_blob(registry.url, owner.write_token, hostile).status_code == 201
    doc = resign(owner, signing.read_signature(bundle)["statement"], {"manifest.json": hostile})
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, doc)  # (timeout 30 s)
    assert (r.status_code, error_code(r)) == (400, "bad_manifest"), r.text
    assert r.json()["error"]["message"].startswith("manifest.json is not JSON")
    # Non-vacuous: the bundle's own signature publishes, all of it (nothing of the refusal stuck).
    assert publish(registry.url, owner.write_token, owner.name, "alpha", 1,
                   signing.read_signature(bundle)).status_code == 201


def test_duplicate_keys_in_a_publish_body_are_refused(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1, adapters=("alpha",))
    upload_blobs(registry.url, owner.write_token, bundle)
    doc = signing.read_signature(bundle)
    text = json.dumps({"signature": doc})
    body = text[:-1] + ', "signature": ' + json.dumps(doc) + "}"  # {"signature": A, "signature": A}
    r = requests.put(f"{registry.url}/v1/adapters/{owner.name}/alpha/versions/1", data=body.encode(),
                     headers=auth(owner.write_token), timeout=30)
    assert (r.status_code, error_code(r)) == (400, "bad_request"), r.text
    assert "key 'signature' appears twice" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- finding 3


def test_signature_with_flipped_unused_bits_never_publishes(registry: Registry, owner: Owner) -> None:
    """The fuzz test's find (byte of the last signature character before '==', bit 1 -> 200)."""
    from tests.format.test_canonical_forms import same_bytes_other_spelling

    bundle = owner.bundle(registry.tmpdir("b"), 1, adapters=("alpha",))
    upload_blobs(registry.url, owner.write_token, bundle)
    doc = signing.read_signature(bundle)
    spellings = [{**doc, "signature": s} for s in same_bytes_other_spelling(doc["signature"])]
    spellings += [{**doc, "public_key": s} for s in same_bytes_other_spelling(doc["public_key"])]
    for other in spellings:
        r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, other)
        assert (r.status_code, error_code(r)) == (403, "bad_signature"), r.text
        assert "not canonical base64" in r.json()["error"]["message"]
    assert publish(registry.url, owner.write_token, owner.name, "alpha", 1, doc).status_code == 201
    stored = requests.get(f"{registry.url}/v1/adapters/{owner.name}/alpha", headers=auth(owner.read_token), timeout=30)
    assert stored.json()["signature"] == doc  # the one canonical spelling is what hosts get
    for other in spellings:  # not even as an identical re-publish
        assert publish(registry.url, owner.write_token, owner.name, "alpha", 1, other).status_code == 403


# --------------------------------------------------------------------------- finding 5


def test_batch_publish_refuses_an_adapter_named_with_a_trailing_newline(registry: Registry, owner: Owner) -> None:
    bundle = make_bundle(registry.tmpdir("b"), ("evil\n",))  # a file cores/evil\n.safetensors
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = [{"path": "manifest.json", **_digest(bundle / "manifest.json")}]
    files += [{"path": rel, **meta} for rel, meta in sorted(manifest["files"].items())]
    st = {"format": "soppu-statement/1", "owner": owner.name, "adapters": ["evil\n"], "version": 1,
          "base_model": manifest["base_model"], "expires_at": FUTURE, "files": sorted(files, key=lambda f: f["path"])}
    doc = signing.sign_statement(st, owner.key)
    upload_blobs_of(registry.url, owner.write_token, bundle, st)
    r = batch(registry.url, owner.write_token, owner.name, 1, doc)
    assert (r.status_code, error_code(r)) == (400, "bad_statement"), r.text
    assert "must match" in r.json()["error"]["message"]
    r = requests.get(f"{registry.url}/v1/adapters/{owner.name}/evil%0A", headers=auth(owner.read_token), timeout=30)
    assert (r.status_code, error_code(r)) == (400, "bad_name")


def test_version_with_a_trailing_newline_is_not_a_version(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1, adapters=("alpha",))
    upload_blobs(registry.url, owner.write_token, bundle)
    doc = signing.read_signature(bundle)
    base = f"{registry.url}/v1/adapters/{owner.name}/alpha/versions"
    assert publish(registry.url, owner.write_token, owner.name, "alpha", 1, doc).status_code == 201
    assert requests.get(f"{base}/1", headers=auth(owner.read_token), timeout=30).status_code == 200  # non-vacuous
    for path in ("1%0A", "1%0D%0A", "%0A1"):
        r = requests.get(f"{base}/{path}", headers=auth(owner.read_token), timeout=30)
        assert (r.status_code, error_code(r)) == (400, "bad_request"), (path, r.text)
        r = requests.put(f"{base}/{path}", json={"signature": doc}, headers=auth(owner.write_token), timeout=30)
        assert (r.status_code, error_code(r)) == (400, "bad_request"), (path, r.text)
    r = batch(registry.url, owner.write_token, owner.name, "1%0A", doc)
    assert (r.status_code, error_code(r)) == (400, "bad_request")
    for path in (f"/v1/keys/{owner.name}%0A", f"/v1/adapters/{owner.name}%0A/alpha",
                 "/v1/blobs/sha256:" + doc["statement"]["files"][0]["sha256"] + "%0A"):
        r = requests.get(registry.url + path, headers=auth(owner.read_token), timeout=30)
        assert r.status_code == 400, (path, r.text)


def _digest(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def upload_blobs_of(url: str, token: str, bundle: Path, st: dict[str, Any]) -> None:
    for f in st["files"]:
        r = put_blob(url, token, (bundle / f["path"]).read_bytes(), f["sha256"])
        assert r.status_code in (200, 201), r.text


# --------------------------------------------------------------------------- finding 6

QUOTA = 24 * KiB
JUNK = 7 * KiB  # 4 x 7 KiB = 28 KiB kept against a 24 KiB quota before the fix (28 MiB / 8 MiB in the issue)


@pytest.fixture
def quota_server(tmp_path: Path, backend: Backend):  # noqa: ANN201
    server = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", "0",
                    "--max-unpublished-bytes", str(QUOTA), backend=backend).start()
    try:
        yield server
    finally:
        server.stop()
    log = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
    assert "Traceback" not in log, log[-3000:]


def _with_extra_file(owner: Owner, root: Path, version: int, rel: str, data: bytes) -> Path:
    """A bundle whose manifest lists ``rel`` (``data``) besides the format's files, signed."""
    bundle = make_bundle(root, ("alpha",))
    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    (bundle / rel).write_bytes(data)
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"][rel] = _digest(bundle / rel)
    (bundle / "manifest.json").write_text(json.dumps(m))
    signing.sign_bundle(bundle, owner.key, owner.name, version, FUTURE)
    return bundle


@pytest.mark.parametrize("rel", ["junk.bin", "cores/nobody.safetensors", "README.md"])
def test_extra_files_are_refused_and_keep_counting_against_the_quota(quota_server: Server, tmp_path: Path,
                                                                     rel: str) -> None:
    owner = new_owner(quota_server.storage(), "launder", tmp_path / "keys")
    kept = 0
    for v in range(1, 5):
        bundle = _with_extra_file(owner, tmp_path / f"b{v}", v, rel, bytes([v]) * JUNK)
        statuses = [put_blob(quota_server.url, owner.write_token, (bundle / f["path"]).read_bytes(),
                             f["sha256"]).status_code for f in signing.read_signature(bundle)["statement"]["files"]]
        if 413 in statuses:  # the quota holds: the junk of earlier rounds still counts
            break
        r = publish(quota_server.url, owner.write_token, owner.name, "alpha", v, signing.read_signature(bundle))
        assert (r.status_code, error_code(r)) == (400, "bad_manifest"), r.text
        assert f"`files` lists `{rel}`, which a bundle does not hold" in r.json()["error"]["message"]
        kept += JUNK
    assert kept < 4 * JUNK and kept <= QUOTA
    assert requests.get(f"{quota_server.url}/v1/adapters/{owner.name}/alpha", headers=auth(owner.read_token),
                        timeout=30).status_code == 404  # nothing was published
    # Non-vacuous: the same owner's clean bundle is accepted once it makes room (here: a new owner).
    clean_owner = new_owner(quota_server.storage(), "clean", tmp_path / "keys")
    clean = clean_owner.bundle(tmp_path / "clean", 1, adapters=("alpha",))
    upload_blobs(quota_server.url, clean_owner.write_token, clean)
    assert publish(quota_server.url, clean_owner.write_token, clean_owner.name, "alpha", 1,
                   signing.read_signature(clean)).status_code == 201


def test_junk_in_metrics_json_is_refused(registry: Registry, owner: Owner) -> None:
    """metrics.json is part of the format, so it is bounded and checked instead."""
    junk_metrics = json.dumps({"error_definition": "x", "modules": [], "junk": "A" * 4000}).encode()
    too_big = json.dumps({"error_definition": "x", "modules": [{"module": "m", "error": {}, "lower_bound": {},
                                                                "pad": "A" * (70 * KiB)}]}).encode()
    real = json.dumps({"error_definition": "unsquared relative Frobenius norm", "modules": [
        {"module": "model.layers.0.self_attn.q_proj", "error": {"alpha": 0.5}, "lower_bound": {"alpha": 0.1}}]}).encode()
    for data, status, needle in ((junk_metrics, 400, "must be an object with `error_definition`"),
                                 (too_big, 400, "over the limit of"), (real, 201, None)):
        bundle = _with_extra_file(owner, registry.tmpdir("m"), 1, METRICS, data)
        upload_blobs(registry.url, owner.write_token, bundle)
        r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, signing.read_signature(bundle))
        assert r.status_code == status, r.text
        if needle:
            assert error_code(r) == "bad_manifest" and needle in r.json()["error"]["message"], r.text


# --------------------------------------------------------------------------- finding 7


def test_anonymous_uploads_answered_before_their_body_log_no_traceback(tmp_path: Path, backend: Backend) -> None:
    """Uploads refused (401, then 429) before their body is read, each client resetting the
    connection as soon as the answer starts, 20 at a time (3 rounds): the log stays free of
    tracebacks (before: the FIN after the answer raised ENOTCONN, logged as an unhandled error)."""
    server = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", "5", backend=backend).start()
    statuses: list[bytes] = []

    def refused_upload() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.sendall(f"PUT /v1/blobs/sha256:{'0' * 64} HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
                      "Authorization: Bearer soppu_0000000000000000_guess\r\n\r\n".encode())
            statuses.append(s.recv(12)[9:12])  # the first bytes of the answer, then a reset
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    try:
        for _ in range(3):
            threads = [threading.Thread(target=refused_upload) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(statuses) == 60 and set(statuses) == {b"401", b"429"}, statuses  # both kinds, no body byte read
        time.sleep(0.5)
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        server.stop()
    log = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
    assert "Traceback" not in log and "OSError" not in log, log[-3000:]


# --------------------------------------------------------------------------- finding 8


def test_what_one_adapter_makes_a_host_materialize_is_capped(tmp_path: Path, backend: Backend) -> None:
    """The test bundle's adapters are served as 2 x (6 + 5) + 2 x (3 + 5) = 38 parameters each."""
    server = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", "0", "--max-served-params", "37",
                    backend=backend).start()
    try:
        owner = new_owner(server.storage(), "amp", tmp_path / "keys")
        bundle = owner.bundle(tmp_path / "b", 1, adapters=("alpha",))
        upload_blobs(server.url, owner.write_token, bundle)
        r = publish(server.url, owner.write_token, owner.name, "alpha", 1, signing.read_signature(bundle))
        assert (r.status_code, error_code(r)) == (400, "bad_manifest"), r.text
        assert r.json()["error"]["message"] == (
            "manifest.json: each adapter would be served as 38 parameters (sum of k x (d_out + d_in) over 2 "
            "module(s)), over this registry's limit of 37 (--max-served-params); compress with a smaller --rank "
            "or fewer modules")
    finally:
        server.stop()
    server = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", "0", "--max-served-params", "38",
                    backend=backend).start()
    try:  # at the limit: published
        r = publish(server.url, owner.write_token, owner.name, "alpha", 1, signing.read_signature(bundle))
        assert r.status_code == 201, r.text
    finally:
        server.stop()
