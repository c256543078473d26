"""Stateless replicas (issue 13): three `soppu-registry serve` processes on loopback ports over ONE
PostgreSQL database and ONE SeaweedFS bucket (postgres+s3 only: shared state is the point).

* concurrent publishes of one version through different replicas: exactly one 201; the rest 200
  (identical files) or 409 ``conflict`` (other files), and every replica then serves the winner;
* kill -9 of a replica during uploads and batch publishes: every acknowledged version reads back
  byte for byte from every replica, no version is half-visible (every listed blob is stored, every
  bundle all or nothing), and the interrupted work can simply be retried;
* a serving source pointed at replica A materializes what was published through replica B;
* gc run from one place while replicas publish never leaves a version listing a removed blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from soppu_client.format import signing
from soppu_client.format.errors import RegistryError
from soppu_client.format.refs import AdapterRef
from soppu_client.registry_client import RegistryClient
from soppu_registry.auth import issue_token
from soppu_registry.devservices import Services
from soppu_registry.storage import Storage
from tests.registry.regkit import (
    REGISTRY_BIN,
    Owner,
    Server,
    auth,
    error_code,
    new_owner,
    publish,
    retry_uploads,
    upload_blobs,
)
from tests.registry.services import POSTGRES, Backend

N_REPLICAS = 3


@dataclass
class Replicas:
    servers: list[Server]
    store: Storage
    tmp: Path
    serving_token: str

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def owner(self, prefix: str) -> Owner:
        return new_owner(self.store, f"{prefix}-{time.monotonic_ns() % 10**9}", self.tmp / "keys")


@pytest.fixture
def replicas(services: Services, tmp_path: Path) -> Iterator[Replicas]:
    backend = Backend(POSTGRES, services, shared=services.fresh("replicas"))
    servers = []
    for i in range(N_REPLICAS):
        (tmp_path / f"replica{i}").mkdir()
        servers.append(Server(tmp_path / f"replica{i}" / "data", "--rate", "0", "--max-auth-failures", "0",
                              backend=backend))
    try:
        for s in servers:
            s.start()
        store = backend.storage(tmp_path / "admin")
        _, serving = issue_token(store, None, ["serving-read"], "replica tests")
        yield Replicas(servers, store, tmp_path, serving)
    finally:
        for s in servers:
            s.stop()
    logs = "".join(p.read_text() for p in tmp_path.glob("replica*/server-*.log"))
    assert "Traceback" not in logs, logs[-3000:]


def race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run every call at once (threads released together by a barrier); results in call order."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_one_version_published_at_once_through_every_replica_has_exactly_one_winner(replicas: Replicas) -> None:
    o, urls = replicas.owner("race"), replicas.urls
    # Same files through all replicas at once: one 201, the others 200 (identical).
    same = o.bundle(replicas.tmp / "same", 1, adapters=("alpha",))
    for url in urls:  # each replica streams the blobs to the shared bucket (or finds them there)
        upload_blobs(url, o.write_token, same)
    doc = signing.read_signature(same)
    got = race([lambda url=url: publish(url, o.write_token, o.name, "alpha", 1, doc) for url in urls * 3])
    assert sorted(r.status_code for r in got) == [200] * (3 * N_REPLICAS - 1) + [201]
    # Other files, same version 2, through all replicas at once: one 201, the others 409 conflict.
    bundles = [o.bundle(replicas.tmp / f"other{i}", 2, adapters=("alpha",)) for i in range(2 * N_REPLICAS)]
    for i, b in enumerate(bundles):
        upload_blobs(urls[i % N_REPLICAS], o.write_token, b)
    docs = [signing.read_signature(b) for b in bundles]
    assert len({json.dumps(d, sort_keys=True) for d in docs}) == len(docs)  # really different
    got = race([lambda i=i: publish(urls[i % N_REPLICAS], o.write_token, o.name, "alpha", 2, docs[i])
                for i in range(len(docs))])
    assert sorted(r.status_code for r in got) == [201] + [409] * (len(docs) - 1), [r.text for r in got]
    assert {error_code(r) for r in got if r.status_code == 409} == {"conflict"}
    winner = docs[[r.status_code for r in got].index(201)]
    for url in urls:  # every replica serves the winner, and only it
        r = requests.get(f"{url}/v1/adapters/{o.name}/alpha/versions/2", headers=auth(o.read_token), timeout=10)
        assert r.status_code == 200 and r.json()["signature"] == winner
        r = requests.get(f"{url}/v1/adapters/{o.name}/alpha/versions", headers=auth(o.read_token), timeout=10)
        assert r.json()["versions"] == [1, 2]


def _writer(urls: list[str], o: Owner, bundles: list[Path], acked: list[tuple[Owner, dict]],
            failed: list[str]) -> None:
    """Upload + batch-publish each bundle through the replicas in turn; a dead replica's error is
    noted and the writer goes on with the next bundle (on the next replica)."""
    for i, b in enumerate(bundles):
        client = RegistryClient(urls[i % len(urls)], o.write_token, retries=0, timeout=10)
        try:
            client.upload_bundle(b, verify_local=False, jobs=2)
        except (RegistryError, requests.RequestException, OSError) as e:
            failed.append(f"{o.name} v{i + 1} via {urls[i % len(urls)]}: {e}")
            continue
        acked.append((o, signing.read_signature(b)))


def _half_sent_blob(port: int, o: Owner) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall((f"PUT /v1/blobs/sha256:{'0' * 64} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {o.write_token}\r\n"
               "Content-Length: 100000\r\n\r\n").encode() + b"\1" * 50000)
    return s


def test_kill9_of_a_replica_during_writes_loses_nothing_acknowledged(replicas: Replicas) -> None:
    store, urls, victim = replicas.store, replicas.urls, replicas.servers[1]
    owners = [replicas.owner(f"k{i}") for i in range(3)]
    versions = 10
    work = {o.name: [o.bundle(replicas.tmp / f"{o.name}-v{v}", v, adapters=(f"a{v % 2}", f"b{v % 2}"))
                     for v in range(1, versions + 1)] for o in owners}
    slow = _half_sent_blob(victim.port, owners[0])  # a write certainly in progress on the victim
    acked: list[tuple[Owner, dict]] = []
    failed: list[str] = []
    threads = [threading.Thread(target=_writer, args=(urls, o, work[o.name], acked, failed)) for o in owners]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(victim.data.joinpath("tmp").iterdir()), "expected a partial upload in progress on the victim"
    victim.kill()
    for t in threads:
        t.join(300)
    slow.close()
    assert len(acked) >= 6, failed
    assert failed, "expected some uploads through the killed replica to fail"
    live = [s.url for s in replicas.servers if s is not victim]
    for url in live:  # every acknowledged version reads back, byte for byte, from every live replica
        _check_acked(url, acked)
    # No half-visible version: every listed blob is stored with its size and hash, and every
    # bundle is all or nothing (both of its adapters at that version, or neither).
    rows = store.read("SELECT v.owner, v.name, v.version, fs.files FROM versions v JOIN file_sets fs ON fs.files_digest = v.files_digest")
    assert len(rows) >= 2 * len(acked)
    for row in rows:
        for f in json.loads(row["files"]):
            assert store.blob_size(f["sha256"]) == f["size"], (row["owner"], row["name"], row["version"])
            assert hashlib.sha256(store.read_blob(f["sha256"])).hexdigest() == f["sha256"]
    by_version: dict[tuple[str, int], set[str]] = {}
    for row in rows:
        by_version.setdefault((row["owner"], row["version"]), set()).add(row["name"])
    for (_, v), names in by_version.items():
        assert names == {f"a{v % 2}", f"b{v % 2}"}, names
    # The killed replica comes back (its partial upload removed) and serves the same state; the
    # interrupted work is simply retried.
    victim.start()
    assert list(victim.data.joinpath("tmp").iterdir()) == []
    _check_acked(victim.url, acked)
    for o in owners:
        retry_uploads(RegistryClient(victim.url, o.write_token), work[o.name])
        for url in urls:
            assert RegistryClient(url, o.read_token).get_version(o.name, f"a{versions % 2}")["version"] == versions


def _check_acked(url: str, acked: list[tuple[Owner, dict]]) -> None:
    for o, doc in acked:
        reader = RegistryClient(url, o.read_token)
        st = doc["statement"]
        for name in st["adapters"]:
            got = reader.get_version(o.name, name, st["version"])
            assert got["signature"] == doc, (url, o.name, name)
        for f in st["files"]:
            assert hashlib.sha256(reader.get_blob(f["sha256"])).hexdigest() == f["sha256"]


def test_serving_source_on_replica_a_reads_what_replica_b_published(replicas: Replicas) -> None:
    from soppu_client.format.bundle import Bundle, export_peft
    from soppu_serving.cache import MARKER, Cache
    from soppu_serving.session import Session
    from soppu_serving.settings import Settings

    o = replicas.owner("serve")
    bundle = o.bundle(replicas.tmp / "served", 1, adapters=("alpha", "beta"))
    res = RegistryClient(replicas.urls[1], o.write_token).upload_bundle(bundle)  # published through B
    assert res.adapters == {"alpha": "created", "beta": "created"}
    settings = Settings(registry_url=replicas.urls[0], cache_dir=replicas.tmp / "cache")  # served from A
    cache = Cache(replicas.tmp / "cache")
    served = Session(settings).serve(AdapterRef(o.name, "alpha"), replicas.serving_token)
    final, stats = served.path, served.stats
    assert stats.materialized and cache.is_complete(final)
    assert final == cache.version_dir(o.name, "alpha", 1)
    assert set(stats.blobs_downloaded) >= {"basis.safetensors", "cores/alpha.safetensors"}  # all from A
    # The PEFT dir built from what A served equals the one built from the bundle B received.
    reference = replicas.tmp / "reference"
    export_peft(Bundle.open(bundle), "alpha", reference)
    got = {p.name: p.read_bytes() for p in final.iterdir() if p.name != MARKER}
    want = {p.name: p.read_bytes() for p in reference.iterdir()}
    assert got and got == want


def test_gc_from_one_place_while_replicas_publish(replicas: Replicas, services: Services) -> None:
    """gc with a zero grace period, run repeatedly while three replicas take uploads and publishes:
    uploads may have to be re-sent (gc removed them before their publish), but no published version
    ever lists a removed blob, and every acknowledged version reads back from every replica."""
    store, urls = replicas.store, replicas.urls
    o = replicas.owner("gcrace")
    bundles = [o.bundle(replicas.tmp / f"gc-v{v}", v, adapters=("g",)) for v in range(1, 10)]
    stray = os.urandom(3000)  # uploaded, never published: gc must take it
    assert requests.put(f"{urls[2]}/v1/blobs/sha256:{hashlib.sha256(stray).hexdigest()}", data=stray,
                        headers=auth(o.write_token), timeout=10).status_code == 201
    stop = threading.Event()
    reports: list[dict] = []
    loc = replicas.servers[0].backend.shared
    assert loc is not None

    def collect() -> None:
        while not stop.is_set():
            r = subprocess.run([str(REGISTRY_BIN), "gc", "--data", str(replicas.tmp / "gc"), *loc.args(), "--grace", "0s",
                                "--json"], capture_output=True, text=True, timeout=120, check=False,
                               env={**os.environ, **services.env})
            assert r.returncode == 0, r.stderr
            reports.append(json.loads(r.stdout))

    gc_thread = threading.Thread(target=collect)
    gc_thread.start()
    acked = []
    try:
        for i, b in enumerate(bundles):
            client = RegistryClient(urls[i % N_REPLICAS], o.write_token, retries=0)
            for _attempt in range(20):
                try:
                    client.upload_bundle(b, verify_local=False)
                    break
                except RegistryError as e:  # gc took a blob between upload and publish: send again
                    assert e.code in ("missing_blob", "retry"), e
            else:
                pytest.fail(f"v{i + 1} never got through while gc ran")
            acked.append((o, signing.read_signature(b)))
    finally:
        stop.set()
        gc_thread.join(300)
    removed = {h for r in reports for h in r["removed"]}
    assert hashlib.sha256(stray).hexdigest() in removed, reports
    for url in urls:
        _check_acked(url, acked)
    for row in store.read("SELECT fs.files FROM versions v JOIN file_sets fs ON fs.files_digest = v.files_digest WHERE v.owner = ?", (o.name,)):
        for f in json.loads(row["files"]):
            assert store.blob_size(f["sha256"]) == f["size"]
