"""Tenant isolation of blobs (issue 10 item 1), against a real `soppu-registry serve`.

The attack: Bob knows the sha256 of Alice's manifest.json and one adapter name. With his own key
and tokens he probes her blobs (HEAD), publishes a version listing her manifest (whose errors
leaked its size and contents), then publishes her whole file list under his name and reads every
file through it. Against the code before ownership (commit 098ffad) the HEAD answered 200 with the
size, the publish errors echoed her sizes, and the full publish was 201. Now: an owner owns what it
uploaded; a digest alone opens nothing and every refusal looks like an absent blob.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import requests

from soppu_client.format import signing
from soppu_client.format.names import STATEMENT_FORMAT
from tests.registry.regkit import (
    FUTURE,
    Owner,
    Registry,
    auth,
    error_code,
    publish,
    put_blob,
    upload_blobs,
)


def blob_url(registry: Registry, hexd: str) -> str:
    return f"{registry.url}/v1/blobs/sha256:{hexd}"


def not_uploaded(files: list[dict]) -> str:
    return "; ".join(f"{f['path']} (sha256:{f['sha256']}) was not uploaded" for f in files)


def published_alice(registry: Registry, alice: Owner) -> tuple[dict, list[dict]]:
    bundle = alice.bundle(registry.tmpdir("alice"), adapters=("secret-a", "secret-b"))
    upload_blobs(registry.url, alice.write_token, bundle)
    doc = signing.read_signature(bundle)
    assert publish(registry.url, alice.write_token, alice.name, "secret-a", 1, doc).status_code == 201
    return doc, doc["statement"]["files"]


def test_digest_alone_gives_no_read_no_publish_no_oracle(registry: Registry) -> None:
    alice, bob = registry.new_owner("alice"), registry.new_owner("bob")
    alice_doc, files = published_alice(registry, alice)
    manifest = next(f for f in files if f["path"] == "manifest.json")
    absent = hashlib.sha256(os.urandom(32)).hexdigest()

    # Preconditions and controls: the blobs exist, Alice and serving tokens read them, Bob's
    # tokens work, and the 404 for a blob that does not exist is what Bob must get for hers.
    for f in files:
        for token in (alice.read_token, alice.write_token, registry.serving_token):
            r = requests.get(blob_url(registry, f["sha256"]), headers=auth(token), timeout=10)
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == f["sha256"]
        assert requests.head(blob_url(registry, f["sha256"]), headers=auth(alice.read_token), timeout=10).status_code == 200
    assert requests.get(f"{registry.url}/v1/keys/{bob.name}", headers=auth(bob.read_token), timeout=10).status_code == 200
    missing_get = requests.get(blob_url(registry, absent), headers=auth(bob.write_token), timeout=10)
    assert missing_get.status_code == 404
    assert missing_get.json() == {"error": {"code": "not_found", "message":
                                            f"blob sha256:{absent} not found among the blobs this token can read"}}

    # 1. HEAD and GET of her blobs with his tokens: exactly the answer for an absent blob.
    for f in files:
        for token in (bob.read_token, bob.write_token):
            h = requests.head(blob_url(registry, f["sha256"]), headers=auth(token), timeout=10)
            assert (h.status_code, h.content, h.headers.get("content-length")) == (404, b"", "0")
            g = requests.get(blob_url(registry, f["sha256"]), headers=auth(token), timeout=10)
            assert g.status_code == 404
            assert g.json() == {"error": {"code": "not_found", "message":
                                          f"blob sha256:{f['sha256']} not found among the blobs this token can read"}}

    # 2. A probe publish listing her manifest with a guessed size: refused like a missing blob,
    #    before the manifest is read; the error holds only what Bob sent.
    probe = {"format": STATEMENT_FORMAT, "owner": bob.name, "adapters": ["secret-a"], "version": 1,
             "base_model": "guess/model", "expires_at": FUTURE,
             "files": [{"path": "manifest.json", "sha256": manifest["sha256"], "size": 1}]}
    r = publish(registry.url, bob.write_token, bob.name, "secret-a", 1, signing.sign_statement(probe, bob.key))
    assert (r.status_code, r.json()) == (400, {"error": {"code": "missing_blob", "message": not_uploaded(probe["files"])}})
    probe["files"][0]["size"] = manifest["size"]  # even the right size (he cannot learn it) changes nothing
    r = publish(registry.url, bob.write_token, bob.name, "secret-a", 1, signing.sign_statement(probe, bob.key))
    assert (r.status_code, r.json()) == (400, {"error": {"code": "missing_blob", "message": not_uploaded(probe["files"])}})

    # 3. Her whole file list (as if leaked) signed by Bob under his name: refused the same way,
    #    so he cannot republish her adapters, and still reads none of her blobs.
    stolen = {**alice_doc["statement"], "owner": bob.name}
    r = publish(registry.url, bob.write_token, bob.name, "secret-a", 1, signing.sign_statement(stolen, bob.key))
    assert (r.status_code, r.json()) == (400, {"error": {"code": "missing_blob", "message": not_uploaded(files)}})
    for path in ("", "/versions", "/versions/1"):
        r = requests.get(f"{registry.url}/v1/adapters/{bob.name}/secret-a{path}", headers=auth(bob.read_token), timeout=10)
        assert r.status_code == 404 or r.json()["versions"] == []
    for f in files:
        assert requests.get(blob_url(registry, f["sha256"]), headers=auth(bob.read_token), timeout=10).status_code == 404

    # Control: the same publish works once Bob proves possession by sending the same bytes himself
    # (the stored blobs are not rewritten: 200, created false), and only then can he read them.
    for f in files:
        data = registry.store.read_blob(f["sha256"])  # Bob holds a copy of the bytes
        mtime = registry.store.blobs.stat(f["sha256"])[1]
        r = put_blob(registry.url, bob.write_token, data, f["sha256"])
        assert (r.status_code, r.json()["created"]) == (200, False)
        assert registry.store.blobs.stat(f["sha256"])[1] >= mtime
    r = publish(registry.url, bob.write_token, bob.name, "secret-a", 1, signing.sign_statement(stolen, bob.key))
    assert r.status_code == 201, r.text
    for f in files:
        assert requests.get(blob_url(registry, f["sha256"]), headers=auth(bob.read_token), timeout=10).status_code == 200
    # Alice's blobs and version are untouched by Bob's copy.
    r = requests.get(f"{registry.url}/v1/adapters/{alice.name}/secret-a", headers=auth(alice.read_token), timeout=10)
    assert r.status_code == 200 and r.json()["signature"] == alice_doc


def test_only_owners_head_refreshes_gc_grace(registry: Registry) -> None:
    alice, bob = registry.new_owner("alice"), registry.new_owner("bob")
    data = os.urandom(2048)
    hexd = hashlib.sha256(data).hexdigest()
    assert put_blob(registry.url, alice.write_token, data).status_code == 201
    store = registry.store
    past = time.time() - 7200
    with store.tx() as db:  # Alice's claim is two hours old (the stored copy's age: below)
        db.execute("UPDATE blob_owners SET touched_at = ? WHERE sha256 = ?", (past, hexd))
    stored_at = store.blobs.stat(hexd)[1]
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    for token in (bob.write_token, bob.read_token, registry.serving_token):  # not owners, unpublished: 404
        assert requests.head(blob_url(registry, hexd), headers=auth(token), timeout=10).status_code == 404
    assert store.read("SELECT touched_at FROM blob_owners WHERE sha256 = ?", (hexd,))[0][0] == past
    assert store.blobs.stat(hexd)[1] == stored_at
    # Control: the owner's HEAD (any of its tokens) answers and restarts the grace period.
    r = requests.head(blob_url(registry, hexd), headers=auth(alice.read_token), timeout=10)
    assert (r.status_code, r.headers["x-soppu-size"]) == (200, "2048")
    assert store.read("SELECT touched_at FROM blob_owners WHERE sha256 = ?", (hexd,))[0][0] > past + 3600
    if store.backend.endswith("+dir"):  # the file's mtime too (S3 keeps LastModified: gc reads touched_at)
        assert store.blobs.stat(hexd)[1] > stored_at


def test_unowned_size_mismatch_is_not_revealed(registry: Registry, owner: Owner) -> None:
    """A blob the publisher owns with another size is reported as a size mismatch (its own data);
    one it does not own never is."""
    data = os.urandom(100)
    hexd = hashlib.sha256(data).hexdigest()
    assert put_blob(registry.url, owner.write_token, data).status_code == 201
    other = registry.new_owner()
    st = {"format": STATEMENT_FORMAT, "adapters": ["x"], "version": 1, "base_model": "b/m", "expires_at": FUTURE,
          "files": [{"path": "manifest.json", "sha256": hexd, "size": 99}]}
    r = publish(registry.url, owner.write_token, owner.name, "x", 1,
                signing.sign_statement({**st, "owner": owner.name}, owner.key))
    assert (r.status_code, error_code(r)) == (400, "size_mismatch")
    assert r.json()["error"]["message"] == f"manifest.json (sha256:{hexd}) has 100 bytes, statement says 99"
    r = publish(registry.url, other.write_token, other.name, "x", 1,
                signing.sign_statement({**st, "owner": other.name}, other.key))
    assert (r.status_code, r.json()["error"]["message"]) == (400, f"manifest.json (sha256:{hexd}) was not uploaded")


def test_migration_gives_published_blobs_to_their_versions_owner(tmp_path: Path) -> None:
    """sqlite+dir only (the point is an old SQLite data dir; a postgres+s3 store starts at the current
    schema). A data dir from before ``blob_owners`` (simulated: rows dropped, user_version 0): blobs a
    published version lists go to that version's owner, unpublished ones to nobody; the owner then
    publishes a new version reusing them as the client does (HEAD says present, no PUT)."""
    import sqlite3

    from soppu_client.format.errors import RegistryError
    from soppu_client.registry_client import RegistryClient
    from soppu_registry.storage import SCHEMA_VERSION, Storage
    from tests.registry.regkit import Server, new_owner

    data = tmp_path / "data"
    store = Storage(data)
    alice = new_owner(store, "mig-alice", tmp_path / "keys")
    server = Server(data, "--rate", "0").start()
    try:
        v1 = alice.bundle(tmp_path / "v1", 1, adapters=("m",), seed=5)
        RegistryClient(server.url, alice.write_token).upload_bundle(v1)
        stray = os.urandom(100)
        assert put_blob(server.url, alice.write_token, stray).status_code == 201
    finally:
        server.stop()
    files = signing.read_signature(v1)["statement"]["files"]
    v2 = alice.bundle(tmp_path / "v2", 2, adapters=("m",), seed=5)  # same bytes, version 2
    with sqlite3.connect(data / "registry.sqlite3") as db:  # the old schema's state, not yet migrated
        db.execute("DELETE FROM blob_owners")
    # Control: without the migration, the client skips the blobs HEAD reports (Alice reads them
    # through v1) and the publish is refused: she would be locked out of her own blobs.
    server = Server(data, "--rate", "0").start()
    try:
        with pytest.raises(RegistryError) as e:
            RegistryClient(server.url, alice.write_token).upload_bundle(v2)
        assert e.value.code == "missing_blob"
    finally:
        server.stop()
    with sqlite3.connect(data / "registry.sqlite3") as db:
        db.execute("PRAGMA user_version = 0")
    store = Storage(data)  # migrates
    assert all(store.blob_owners(f["sha256"]) == {alice.name} for f in files)
    assert store.blob_owners(hashlib.sha256(stray).hexdigest()) == set()
    assert store.read("PRAGMA user_version")[0][0] == SCHEMA_VERSION
    server = Server(data, "--rate", "0").start()
    try:
        res = RegistryClient(server.url, alice.write_token).upload_bundle(v2)
        assert (res.adapters, res.uploaded) == ({"m": "created"}, [])  # every blob was already Alice's
        r = requests.get(f"{server.url}/v1/adapters/{alice.name}/m", headers=auth(alice.read_token), timeout=10)
        assert r.json()["version"] == 2
    finally:
        server.stop()
