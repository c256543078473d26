"""SIGKILL the server while it writes; after a restart nothing acknowledged is lost and nothing is torn."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import requests

from soppu_client.format import signing
from soppu_client.format.errors import RegistryError
from soppu_client.registry_client import RegistryClient
from tests.registry.regkit import Owner, Server, auth, new_owner, retry_uploads
from tests.registry.services import Backend


def _writer(url: str, o: Owner, bundles: list[Path], acked: list[tuple[str, int, dict]], stop: threading.Event) -> None:
    client = RegistryClient(url, o.write_token, retries=0, timeout=10)
    for b in bundles:
        if stop.is_set():
            return
        try:
            res = client.upload_bundle(b, verify_local=False)
        except RegistryError:
            return  # the server died under us
        doc = signing.read_signature(b)
        for name in res.adapters:
            acked.append((name, doc["statement"]["version"], doc))


def test_sigkill_during_writes_then_restart(tmp_path: Path, backend: Backend) -> None:
    data = tmp_path / "data"
    server = Server(data, "--rate", "0", backend=backend).start()
    store = server.storage()
    owners = [new_owner(store, f"crash{i}", tmp_path / "keys") for i in range(3)]
    work = {o.name: [o.bundle(tmp_path / f"{o.name}-v{v}", v, adapters=(f"a{v % 2}",)) for v in range(1, 16)]
            for o in owners}
    # A half-sent blob, so a write is certainly in progress at the kill.
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall((f"PUT /v1/blobs/sha256:{'0' * 64} HTTP/1.1\r\nHost: x\r\n{_auth_line(owners[0])}"
                  f"Content-Length: 100000\r\n\r\n").encode() + b"\1" * 50000)
    acked: list[tuple[str, int, dict]] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_writer, args=(server.url, o, work[o.name], acked, stop)) for o in owners]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(store.tmp_dir.iterdir()), "expected a partial upload in progress"
    server.kill()
    stop.set()
    for t in threads:
        t.join()
    slow.close()
    assert acked, "nothing was published before the kill"

    restarted = Server(data, "--rate", "0", backend=backend).start()
    try:
        assert store.integrity_check() == "ok"
        assert list(store.tmp_dir.iterdir()) == []  # partial uploads removed at start
        assert requests.head(f"{restarted.url}/v1/blobs/sha256:{'0' * 64}", headers=auth(owners[0].read_token)).status_code == 404
        by_owner = {o.name: o for o in owners}
        for name, version, doc in acked:  # every acknowledged version survived, byte for byte
            o = by_owner[doc["statement"]["owner"]]
            reader = RegistryClient(restarted.url, o.read_token)
            got = reader.get_version(o.name, name, version)
            assert got["signature"] == doc
            for f in got["files"]:
                assert hashlib.sha256(reader.get_blob(f["sha256"])).hexdigest() == f["sha256"]
        # Whatever else became visible is complete: each blob of each version is on disk and intact.
        for row in store.read("SELECT v.owner, v.name, v.version, fs.files FROM versions v JOIN file_sets fs ON fs.files_digest = v.files_digest"):
            for f in json.loads(row["files"]):
                assert hashlib.sha256(store.read_blob(f["sha256"])).hexdigest() == f["sha256"], (row["owner"], row["name"])
        # And the interrupted work can simply be retried.
        for o in owners:
            client = RegistryClient(restarted.url, o.write_token)
            retry_uploads(client, work[o.name])
            assert client.get_version(o.name, "a1")["version"] == 15
    finally:
        restarted.stop()


def _auth_line(o: Owner) -> str:
    return f"Authorization: Bearer {o.write_token}\r\n"
