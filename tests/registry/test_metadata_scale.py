"""Registry metadata scales with the content, not with adapters x files (issue 13 follow-up).

A batch publish of N adapters stores its files list and signature document ONCE (``file_sets``,
``file_set_members``, ``signatures``) plus one ``versions`` row per adapter; schema 1 (every
version row carrying the whole signature and files list, plus one ``version_files`` row per file)
migrates to that in place, on both backends, and everything reads back the same afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import requests

from soppu_client.format import signing
from soppu_client.registry_client import RegistryClient
from soppu_registry.blobstore import open_blobs
from soppu_registry.sqldb import Database, PostgresDatabase, SqliteDatabase
from soppu_registry.storage import SCHEMA_VERSION, Storage
from tests.registry.regkit import Registry, Server, auth, new_owner, put_blob
from tests.registry.services import POSTGRES, SQLITE, Backend


def _bundle_rows(store: Storage, owner: str) -> dict[str, int]:
    """Rows an owner's published versions occupy, per table (the file sets / signatures they use)."""
    one = lambda sql: int(store.read(sql, (owner,))[0][0])  # noqa: E731
    return {
        "versions": one("SELECT COUNT(*) FROM versions WHERE owner = ?"),
        "file_sets": one("SELECT COUNT(DISTINCT files_digest) FROM versions WHERE owner = ?"),
        "signatures": one("SELECT COUNT(DISTINCT sig_digest) FROM versions WHERE owner = ?"),
        "members": one("SELECT COUNT(*) FROM file_set_members m WHERE m.files_digest IN "
                       "(SELECT files_digest FROM versions WHERE owner = ?)"),
    }


@pytest.mark.parametrize("n", [2, 12])
def test_batch_publish_stores_one_file_set_and_one_signature(registry: Registry, n: int) -> None:
    owner = registry.new_owner("fs")
    names = tuple(f"a{i:02d}" for i in range(n))
    seed = int(hashlib.sha256(owner.name.encode()).hexdigest()[:8], 16)  # v2 below: the same bytes
    bundle = owner.bundle(registry.tmpdir("b"), 1, adapters=names, seed=seed)
    files = signing.read_signature(bundle)["statement"]["files"]
    assert len(files) >= n + 1  # non-vacuous: one core per adapter plus the shared files
    res = RegistryClient(registry.url, owner.write_token).upload_bundle(bundle)
    assert res.adapters == {a: "created" for a in names}
    # one row per adapter in versions; everything else once per bundle (the old layout had n * len(files))
    assert _bundle_rows(registry.store, owner.name) == {"versions": n, "file_sets": 1, "signatures": 1,
                                                        "members": len(files)}
    # the bulk ownership/size lookup the publish checks can use: sizes for the owner, None for others
    digests = [f["sha256"] for f in files]
    assert registry.store.owned_blob_sizes(owner.name, digests) == {f["sha256"]: f["size"] for f in files}
    assert set(registry.store.owned_blob_sizes(registry.new_owner("fx").name, digests).values()) == {None}
    reader = RegistryClient(registry.url, owner.read_token)
    for name in (names[0], names[-1]):
        v = reader.get_version(owner.name, name, 1)
        assert v["signature"] == signing.read_signature(bundle) and v["files"] == files
    # version 2, same bytes: the file set is reused, only the signature is new
    RegistryClient(registry.url, owner.write_token).upload_bundle(owner.bundle(registry.tmpdir("b2"), 2, adapters=names,
                                                                                       seed=seed))
    assert _bundle_rows(registry.store, owner.name) == {"versions": 2 * n, "file_sets": 1, "signatures": 2,
                                                        "members": len(files)}


# -- schema 1 -> 2 migration --------------------------------------------------------------------

OLD_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS owners (name TEXT PRIMARY KEY, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, owner TEXT NOT NULL REFERENCES owners(name),
    public_key TEXT NOT NULL, created_at TEXT NOT NULL, rotated_at TEXT, replaced_by TEXT);
CREATE INDEX IF NOT EXISTS keys_owner ON keys(owner);
CREATE TABLE IF NOT EXISTS tokens (token_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL,
    owner TEXT REFERENCES owners(name), scopes TEXT NOT NULL, label TEXT, created_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS versions (owner TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    base_model TEXT NOT NULL, files_digest TEXT NOT NULL, signature TEXT NOT NULL, files TEXT NOT NULL,
    published_at TEXT NOT NULL, PRIMARY KEY (owner, name, version));
CREATE TABLE IF NOT EXISTS version_files (owner TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    path TEXT NOT NULL, sha256 TEXT NOT NULL, size BIGINT NOT NULL, PRIMARY KEY (owner, name, version, path));
CREATE INDEX IF NOT EXISTS version_files_sha ON version_files(sha256);
CREATE TABLE IF NOT EXISTS blob_owners (sha256 TEXT NOT NULL, owner TEXT NOT NULL, size BIGINT NOT NULL,
    touched_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (sha256, owner));
CREATE INDEX IF NOT EXISTS blob_owners_owner ON blob_owners(owner);
"""


def _published_state(tmp: Path) -> tuple[Path, Storage, list[tuple[str, str, int]], list[Any], bytes]:
    """A current-schema sqlite+dir registry with two owners, batch-published bundles (alice: v1 and
    v2 with the same bytes, bob: v1) and one unpublished blob of alice's."""
    data = tmp / "src"
    store = Storage(data)
    alice, bob = new_owner(store, "mig-alice", tmp / "keys"), new_owner(store, "mig-bob", tmp / "keys")
    server = Server(data, "--rate", "0").start()
    try:
        for o, version, root in ((alice, 1, "a1"), (alice, 2, "a2"), (bob, 1, "b1")):
            bundle = o.bundle(tmp / root, version, adapters=("alpha", "beta", "gamma"), seed=7 if o is alice else 8)
            RegistryClient(server.url, o.write_token).upload_bundle(bundle)
        stray = os.urandom(300)
        assert put_blob(server.url, alice.write_token, stray).status_code == 201
    finally:
        server.stop()
    versions = [(r[0], r[1], int(r[2])) for r in store.read("SELECT owner, name, version FROM versions ORDER BY 1, 2, 3")]
    return data, store, versions, [alice, bob], stray


def _write_old_store(db: Database, src: Storage, versions: list[tuple[str, str, int]], *, old_version: int) -> None:
    """What schema-1 code wrote for ``src``'s state (schema 0: the same without blob_owners rows)."""
    db.create_schema(OLD_SCHEMA_V1)
    with db.tx() as tx:
        for table in ("owners", "keys", "tokens") + (("blob_owners",) if old_version >= 1 else ()):
            rows = src.read(f"SELECT * FROM {table}")
            if rows:
                cols = list(rows[0].keys())
                tx.executemany(f"INSERT INTO {table}({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                               [tuple(r[c] for c in cols) for r in rows])
        for owner, name, version in versions:
            v = src.get_version(owner, name, version)
            ident = src.read("SELECT files_digest FROM versions WHERE owner=? AND name=? AND version=?",
                             (owner, name, version))[0][0]
            tx.execute("INSERT INTO versions(owner,name,version,base_model,files_digest,signature,files,published_at) "
                       "VALUES (?,?,?,?,?,?,?,?)", (owner, name, version, v["base_model"], ident,
                                                   json.dumps(v["signature"], sort_keys=True), json.dumps(v["files"]),
                                                   v["published_at"]))
            tx.executemany("INSERT INTO version_files(owner,name,version,path,sha256,size) VALUES (?,?,?,?,?,?)",
                           [(owner, name, version, f["path"], f["sha256"], f["size"]) for f in v["files"]])
        db.set_schema_version(tx, old_version)


@pytest.mark.parametrize("old_version", [1, 0])
@pytest.mark.parametrize("backend_name", [SQLITE, POSTGRES])
def test_old_schema_store_migrates_and_reads_back(tmp_path: Path, request: pytest.FixtureRequest,
                                                  backend_name: str, old_version: int) -> None:
    data_src, src, versions, (alice, bob), stray = _published_state(tmp_path)
    stray_hex = hashlib.sha256(stray).hexdigest()
    published = {f["sha256"]: f["size"] for o, n, v in versions for f in src.get_version(o, n, v)["files"]}
    assert len(versions) == 9 and stray_hex not in published  # non-vacuous

    # the old store: schema-1 tables and rows, the same blobs
    data = tmp_path / "old"
    if backend_name == SQLITE:
        backend = Backend(SQLITE)
        shutil.copytree(data_src / "blobs", data / "blobs")
        old_db: Database = SqliteDatabase(data / "registry.sqlite3")
    else:
        backend = Backend(POSTGRES, request.getfixturevalue("services"))
        loc = backend.location(data)
        old_db = PostgresDatabase(loc.database)
        blobs = open_blobs(loc.blobs, tmp_path / "put-cache")
        for hexd in src.blobs.list():
            shutil.copyfile(src.blob_path(hexd), tmp_path / "put.tmp")
            blobs.put(hexd, tmp_path / "put.tmp")
    _write_old_store(old_db, src, versions, old_version=old_version)
    with old_db.tx() as tx:
        assert old_db.has_table(tx, "version_files")
        assert int(tx.execute("SELECT COUNT(*) FROM version_files").fetchone()[0]) == \
            sum(len(src.get_version(*k)["files"]) for k in versions)

    store = backend.storage(data)  # migrates
    assert store.db.schema_version() == SCHEMA_VERSION
    with store.tx() as tx:
        assert not store.db.has_table(tx, "version_files")
    for key in versions:
        assert store.get_version(*key) == src.get_version(*key)
    assert store.get_version(alice.name, "beta") == src.get_version(alice.name, "beta", 2)  # latest
    # each distinct files list / signature once: alice's v1 and v2 share bytes (one set), bob has his own
    assert int(store.read("SELECT COUNT(*) FROM file_sets")[0][0]) == 2
    assert int(store.read("SELECT COUNT(*) FROM signatures")[0][0]) == 3
    assert int(store.read("SELECT COUNT(*) FROM file_set_members")[0][0]) == \
        len({(o, f["path"]) for o, n, v in versions for f in src.get_version(o, n, v)["files"]})
    base_model = src.get_version(*versions[0])["base_model"]
    assert store.bases(base_model) == src.bases(base_model) != []
    # ownership and quotas: published blobs belong to their version's owner (schema 0: rebuilt)
    for hexd in published:
        assert store.blob_owners(hexd) == src.blob_owners(hexd) != set()
        assert store.blob_referenced_by(hexd) == src.blob_referenced_by(hexd) != set()
    assert store.blob_owners(stray_hex) == ({alice.name} if old_version >= 1 else set())
    assert store.unpublished_bytes(alice.name) == (len(stray) if old_version >= 1 else 0)
    assert store.unpublished_bytes(bob.name) == 0

    again = backend.storage(data)  # idempotent: a second open changes nothing
    assert again.get_version(bob.name, "gamma") == src.get_version(bob.name, "gamma")

    # a server on the migrated store: reads, authorization, a new version reusing the stored blobs
    server = Server(data, "--rate", "0", backend=backend).start()
    try:
        reader = RegistryClient(server.url, bob.read_token)
        got = reader.get_version(bob.name, "alpha")
        for f in got["files"]:
            assert hashlib.sha256(reader.get_blob(f["sha256"])).hexdigest() == f["sha256"]
        foreign = src.get_version(alice.name, "alpha")["files"][0]["sha256"]
        assert requests.get(f"{server.url}/v1/blobs/sha256:{foreign}", headers=auth(bob.read_token),
                            timeout=10).status_code in (403, 404)
        res = RegistryClient(server.url, alice.write_token).upload_bundle(
            alice.bundle(tmp_path / "a3", 3, adapters=("alpha", "beta", "gamma"), seed=7))
        assert res.adapters == {a: "created" for a in ("alpha", "beta", "gamma")} and res.uploaded == []
    finally:
        server.stop()
    # gc: published blobs stay, the stray goes
    report = store.gc_blobs(0.0)
    assert report["removed"] == [stray_hex]
    assert report["kept_referenced"] == len(published)
    for hexd, size in published.items():
        assert store.blob_size(hexd) == size
    assert store.unpublished_bytes(alice.name) == 0
