"""`soppu-registry gc` on a running server: unpublished blobs past the grace period go, published
ones and recently touched ones stay, and a version never lists a removed blob."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import requests

from soppu_client.format import signing
from soppu_registry.auth import issue_token
from soppu_registry.storage import Storage
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

GRACE_S = 6  # well above a gc subprocess's start-up on a loaded machine
GRACE = f"{GRACE_S}s"


def gc(server: Server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REGISTRY_BIN), "gc", *server.storage_args(), *args], capture_output=True, text=True,
                          check=False, timeout=120, env={**os.environ, **server.backend.env})


def statement_files(bundle: Path) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in signing.read_signature(bundle)["statement"]["files"]}


def test_gc_removes_only_stale_unpublished_blobs(tmp_path: Path, backend: Backend) -> None:
    data = tmp_path / "data"
    server = Server(data, "--rate", "0", backend=backend).start()
    try:
        store = server.storage()
        owner = new_owner(store, "gcowner", tmp_path / "keys")
        _, serving = issue_token(store, None, ["serving-read"])
        published = owner.bundle(tmp_path / "published", adapters=("kept",), seed=1)
        upload_blobs(server.url, owner.write_token, published)
        doc = signing.read_signature(published)
        assert publish(server.url, owner.write_token, owner.name, "kept", 1, doc).status_code == 201
        abandoned = owner.bundle(tmp_path / "abandoned", adapters=("gone",), seed=2)
        upload_blobs(server.url, owner.write_token, abandoned)
        stray = os.urandom(4096)
        stray_hex = hashlib.sha256(stray).hexdigest()
        assert put_blob(server.url, owner.write_token, stray).status_code == 201

        pub_files, ab_files = statement_files(published), statement_files(abandoned)
        all_blobs = {*pub_files.values(), *ab_files.values(), stray_hex}
        assert all(store.blob_size(h) is not None for h in all_blobs)

        # Everything is recent: nothing goes.
        report = json.loads(gc(server, "--grace", "1h", "--json").stdout)
        assert report["removed"] == [] and report["kept_recent"] == len(all_blobs) - len(pub_files)
        assert report["kept_referenced"] == len(pub_files)

        # Past the grace period (GRACE, real time: S3 objects cannot be back-dated); a client HEADs the
        # abandoned bundle's core (about to publish it): it stays.
        time.sleep(GRACE_S + 1.5)
        core_hex = ab_files["cores/gone.safetensors"]

        def head_core() -> None:  # the client checks it again right before each gc run below
            r = requests.head(f"{server.url}/v1/blobs/sha256:{core_hex}", headers=auth(owner.write_token), timeout=10)
            assert r.status_code == 200

        head_core()
        stale = sorted({*ab_files.values(), stray_hex} - {core_hex})

        dry = json.loads(gc(server, "--grace", GRACE, "--dry-run", "--json").stdout)
        assert dry["dry_run"] is True and sorted(dry["removed"]) == stale
        assert all(store.blob_size(h) is not None for h in all_blobs)  # a dry run removes nothing

        head_core()
        proc = gc(server, "--grace", GRACE)
        assert proc.returncode == 0, proc.stderr
        assert f"removed {len(stale)} unpublished blob(s)" in proc.stdout
        assert not any(store.blob_size(h) is not None for h in stale)
        assert store.blob_size(core_hex) is not None
        for rel, h in pub_files.items():  # published blobs stay, and still download
            r = requests.get(f"{server.url}/v1/blobs/sha256:{h}", headers=auth(serving), timeout=10)
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == h, rel

        # Publishing the abandoned bundle now is refused (its basis is gone), never half-listed...
        doc = signing.read_signature(abandoned)
        r = publish(server.url, owner.write_token, owner.name, "gone", 1, doc)
        assert r.status_code == 400 and error_code(r) == "missing_blob"
        # ...and works once the client sends the blobs again.
        upload_blobs(server.url, owner.write_token, abandoned)
        assert publish(server.url, owner.write_token, owner.name, "gone", 1, doc).status_code == 201
    finally:
        server.stop()


def test_gc_bad_input(tmp_path: Path) -> None:
    proc = gc(Server(tmp_path / "nothing-here"))
    assert proc.returncode == 2 and "is not a registry data directory" in proc.stderr
    Storage(tmp_path / "d")
    proc = gc(Server(tmp_path / "d"), "--grace", "soon")
    assert proc.returncode == 2 and "is not a duration such as 90s, 30m, 24h or 7d" in proc.stderr
    assert "Traceback" not in proc.stderr
