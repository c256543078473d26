"""Registry storage: one implementation of the registry's state over two backends.

``sqlite+dir`` (the default, one machine): a data dir::

    <data>/registry.sqlite3          owners, keys, tokens (sha256 only), versions, blob_owners, and
                                     file_sets / file_set_members / signatures: each distinct files
                                     list and signature document once, referenced by digest from
                                     ``versions`` (a bundle's N adapters share one of each)
    <data>/blobs/sha256/ab/<hex>     immutable blobs, named by their sha256
    <data>/tmp/                      partial uploads; emptied when a server starts

``postgres+s3`` (stateless replicas): the same tables in PostgreSQL (``--database``), blobs in an
S3-compatible bucket under ``[prefix/]sha256/ab/<hex>`` (``--blobs``); ``<data>`` is then only the
process's scratch (``tmp/`` partial uploads, ``cache/`` verified copies for the checks). The SQL
differences live in ``sqldb`` (placeholders, the write lock: SQLite ``BEGIN IMMEDIATE``, PostgreSQL
a transaction-level advisory lock every write transaction takes), the byte store in ``blobstore``;
everything below (publish checks, quotas, gc, ownership) exists once.

Blob ownership (``blob_owners``): an owner owns the blobs it uploaded. A PUT by an owner-write
token adds its owner; re-sending bytes that are already stored proves possession and adds the
owner too (the stored file is not rewritten). Publishing needs ownership of every listed blob, and
blob reads are limited to owners and readers of a published version listing the blob, so knowing a
digest gives nothing. An owner's *unpublished bytes* (blobs it owns that none of its own published
versions lists) are bounded by a quota, checked again at commit under the write lock.

Blobs no published version lists (uploads never published, e.g. an abandoned upload) are removed
by ``soppu-registry gc`` once untouched for a grace period; an owner's HEAD or PUT of a blob makes
it fresh again, so a client between "the registry has it" and "publish" keeps it. gc also drops an
owner's stale claim (untouched for the grace period, listed by none of its versions) on a blob
other owners keep, which frees that owner's quota. Deleting a blob happens inside a write
transaction, serialized with ``publish`` (which re-checks its blobs and their ownership inside its
own): a version never lists a blob that is gone, and a removed blob has no owners left.

A blob upload streams into a local temp file while its size and sha256 are checked; only then is it
put (dir: fsync + rename + fsync(dir); S3: one PUT, visible only when complete) and, inside the
write transaction, its stored size confirmed before the ``blob_owners`` row that makes it usable
commits. Every metadata write is one transaction (SQLite ``synchronous=FULL``), so a crash at any
point leaves either the old state or the new. A version row is inserted only after its signature,
manifest and every blob were checked, and its blobs re-checked inside the publishing transaction.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from soppu_client.format.names import BASIS, OWNER_RE
from soppu_registry.blobstore import BlobStore, DirBlobStore, open_blobs
from soppu_registry.errors import ApiError
from soppu_registry.sqldb import Database, SqliteDatabase, Tx, open_database, redact, select_in

CHUNK = 1 << 16

SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL REFERENCES owners(name),
    public_key TEXT NOT NULL,            -- base64 of the raw 32-byte Ed25519 key
    created_at TEXT NOT NULL,
    rotated_at TEXT,                     -- set when replaced; NULL while active
    replaced_by TEXT
);
CREATE INDEX IF NOT EXISTS keys_owner ON keys(owner);
CREATE TABLE IF NOT EXISTS key_rotations (  -- the proof (signed by the replaced key) that let a key in
    new_key_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL REFERENCES owners(name),
    proof TEXT NOT NULL                  -- JSON: {statement, signature, key_id, public_key}
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,            -- sha256 hex of the full token string
    owner TEXT REFERENCES owners(name),  -- NULL for serving tokens
    scopes TEXT NOT NULL,                -- comma-separated
    label TEXT,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    base_model TEXT NOT NULL,
    files_digest TEXT NOT NULL,          -- -> file_sets: the version's files; also its "same bytes" identity
    sig_digest TEXT NOT NULL,            -- -> signatures: the signature.json document
    published_at TEXT NOT NULL,
    PRIMARY KEY (owner, name, version)
);
CREATE INDEX IF NOT EXISTS versions_files ON versions(files_digest, owner);
CREATE TABLE IF NOT EXISTS file_sets (   -- each distinct files list once (a bundle's N adapters share one)
    files_digest TEXT PRIMARY KEY,       -- files_digest(files)
    files TEXT NOT NULL                  -- JSON list [{path, sha256, size}] as first published
);
CREATE TABLE IF NOT EXISTS file_set_members (
    files_digest TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    PRIMARY KEY (files_digest, path)
);
CREATE INDEX IF NOT EXISTS file_set_members_sha ON file_set_members(sha256);
CREATE TABLE IF NOT EXISTS signatures (  -- each distinct signature document once
    sig_digest TEXT PRIMARY KEY,         -- sha256 of doc
    doc TEXT NOT NULL                    -- signature.json as canonical JSON (sorted keys)
);
CREATE TABLE IF NOT EXISTS blob_owners (
    sha256 TEXT NOT NULL,
    owner TEXT NOT NULL,
    size BIGINT NOT NULL,
    touched_at DOUBLE PRECISION NOT NULL, -- unix time of this owner's last PUT or HEAD of the blob
    PRIMARY KEY (sha256, owner)
);
CREATE INDEX IF NOT EXISTS blob_owners_owner ON blob_owners(owner);
"""

# Schema version of a store whose schema is current; `Storage._migrate` brings older ones up.
SCHEMA_VERSION = 2

# "owner O has a published version listing blob X" (X: ``{sha}``, O: ``{owner}``): the one join that
# ownership, quotas, gc and blob reads share.
_LISTED_BY = ("EXISTS (SELECT 1 FROM file_set_members m JOIN versions v ON v.files_digest = m.files_digest "
              "WHERE m.sha256 = {sha} AND v.owner = {owner})")


def utcnow() -> str:
    """Current UTC time as RFC 3339 with a Z suffix (microseconds kept for ordering)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def files_digest(files: list[dict[str, Any]]) -> str:
    """Identity of a version's content: sha256 over the sorted (path, sha256, size) triples."""
    rows = sorted((f["path"], f["sha256"], int(f["size"])) for f in files)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def sig_digest(doc_json: str) -> str:
    """Identity of a stored signature document: sha256 of its canonical JSON text."""
    return hashlib.sha256(doc_json.encode()).hexdigest()


def _owns(db: Tx, owner: str, hex_digest: str) -> bool:
    return db.execute("SELECT 1 FROM blob_owners WHERE sha256=? AND owner=?", (hex_digest, owner)).fetchone() is not None


_UNPUBLISHED = ("SELECT COALESCE(SUM(bo.size), 0) FROM blob_owners bo WHERE bo.owner = ? AND bo.sha256 != ? "
                "AND NOT " + _LISTED_BY.format(sha="bo.sha256", owner="bo.owner"))


def unpublished_bytes(db: Tx, owner: str, *, exclude: str | None = None) -> int:
    """Bytes of the blobs ``owner`` owns that none of its published versions lists (``exclude``: one
    digest left out, the blob being stored)."""
    return int(db.execute(_UNPUBLISHED, (owner, exclude or "")).fetchone()[0])


def _store_file_set(db: Tx, ident: str, files: list[dict[str, Any]]) -> None:
    """Record a files list under its digest once (no-op when already stored)."""
    if db.execute("SELECT 1 FROM file_sets WHERE files_digest = ?", (ident,)).fetchone():
        return
    db.execute("INSERT INTO file_sets(files_digest, files) VALUES (?, ?)", (ident, json.dumps(files)))
    db.executemany("INSERT INTO file_set_members(files_digest, path, sha256, size) VALUES (?,?,?,?)",
                   [(ident, f["path"], f["sha256"], int(f["size"])) for f in files])


def _store_signature(db: Tx, doc_json: str) -> str:
    """Record a signature document (canonical JSON) once; returns its digest."""
    digest = sig_digest(doc_json)
    db.execute("INSERT INTO signatures(sig_digest, doc) VALUES (?, ?) ON CONFLICT(sig_digest) DO NOTHING",
               (digest, doc_json))
    return digest


def quota_error(owner: str, quota: int, used: int, hex_digest: str, size: int) -> ApiError:
    """413 ``quota_exceeded``: names the quota, the usage and the fix."""
    return ApiError(413, "quota_exceeded",
                    f"owner {owner!r} has {used} bytes of unpublished blobs; storing sha256:{hex_digest} "
                    f"({size} bytes) would exceed the quota of {quota} bytes (--max-unpublished-bytes). "
                    "Publish versions listing the uploaded blobs, or wait for `soppu-registry gc` to remove "
                    "uploads left unpublished past its grace period")


@dataclass(frozen=True)
class BlobWriteResult:
    digest: str
    size: int
    created: bool


class BlobWriter:
    """Streams one upload into a local temp file, hashing and counting as it goes.

    ``write`` enforces ``max_bytes``, ``expected_size`` and the owner's quota room on every chunk
    (raising before the bytes hit the disk); ``commit`` checks digest and size, fsyncs, puts the
    verified file into the blob store (or touches the stored copy), then in one write transaction
    re-checks the quota, confirms the stored size and records ``owner`` as an owner of the blob.
    ``abort`` (also called on any failure) removes the temp file.
    """

    def __init__(self, store: Storage, hex_digest: str, expected_size: int | None, max_bytes: int,
                 owner: str, quota: int | None = None, room: int | None = None):
        self.store = store
        self.hex = hex_digest
        self.expected_size = expected_size
        self.max_bytes = max_bytes
        self.owner = owner
        self.quota = quota
        self.room = room
        self.size = 0
        self._h = hashlib.sha256()
        self.tmp = store.tmp_dir / f"{hex_digest[:16]}.{uuid.uuid4().hex}.part"
        self._f: BinaryIO | None = open(self.tmp, "xb")  # noqa: SIM115  (closed by commit or abort)

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise ApiError(413, "too_large", f"blob sha256:{self.hex} exceeds the limit of {self.max_bytes} bytes")
        if self.expected_size is not None and self.size > self.expected_size:
            self.abort()
            raise ApiError(400, "size_mismatch", f"blob sha256:{self.hex}: body is longer than the declared {self.expected_size} bytes")
        if self.quota is not None and self.room is not None and self.size > self.room:
            self.abort()
            raise quota_error(self.owner, self.quota, self.quota - self.room, self.hex, self.size)
        self._h.update(chunk)
        assert self._f is not None
        self._f.write(chunk)

    def commit(self) -> BlobWriteResult:
        """Check size and digest, then store the blob (created) or keep the stored copy (not
        created: the caller sent the same bytes, which proves possession). Either way ``owner``
        owns the blob afterwards. The put happens outside the write lock (an S3 PUT can be slow);
        inside it the quota is checked again (concurrent uploads of one owner cannot together
        pass it; a refused blob nobody owns is removed again) and the stored size confirmed."""
        blobs = self.store.blobs
        try:
            if self.expected_size is not None and self.size != self.expected_size:
                raise ApiError(400, "size_mismatch", f"blob sha256:{self.hex}: received {self.size} bytes, declared {self.expected_size}")
            got = self._h.hexdigest()
            if got != self.hex:
                raise ApiError(400, "digest_mismatch", f"blob sha256:{self.hex}: body has sha256:{got}")
            assert self._f is not None
            self._f.flush()
            os.fsync(self._f.fileno())  # the slow part, outside the write lock
            self._f.close()
            self._f = None
            stored = blobs.stat(self.hex)
            # same digest, same bytes: keep the stored copy, restart its gc grace period
            created = not (stored is not None and stored[0] == self.size and blobs.touch(self.hex))
            if created:
                blobs.put(self.hex, self.tmp)  # the only place a blob is created
            with self.store.tx() as db:  # serialized with gc and publish
                if self.quota is not None:
                    used = unpublished_bytes(db, self.owner, exclude=self.hex)
                    if not _owns(db, self.owner, self.hex) and used + self.size > self.quota:
                        if created and not db.execute("SELECT 1 FROM blob_owners WHERE sha256=?", (self.hex,)).fetchone():
                            blobs.delete(self.hex)
                        raise quota_error(self.owner, self.quota, used, self.hex, self.size)
                now_stored = blobs.stat(self.hex)
                if (now_stored is None or now_stored[0] != self.size) and not created:
                    blobs.put(self.hex, self.tmp)  # gc removed the stored copy since we found it: ours replaces it
                    now_stored = blobs.stat(self.hex)
                if now_stored is None or now_stored[0] != self.size:  # never seen: gc takes only old blobs
                    raise ApiError(503, "retry", f"blob sha256:{self.hex} was removed by a concurrent gc "
                                                 "while it was being stored; send it again")
                db.execute("INSERT INTO blob_owners(sha256, owner, size, touched_at) VALUES (?,?,?,?) "
                           "ON CONFLICT(sha256, owner) DO UPDATE SET touched_at = excluded.touched_at",
                           (self.hex, self.owner, self.size, time.time()))
            self.abort()  # removes the temp file when the stored copy was kept
            return BlobWriteResult(f"sha256:{self.hex}", self.size, created)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self.tmp.unlink(missing_ok=True)


class Storage:
    """The registry's persistent state; safe to share between threads and between processes.

    ``Storage(data_dir)``: sqlite+dir in ``data_dir``. ``database`` (postgresql://...) and
    ``blobs`` (s3://...) move the metadata and the bytes out of it; ``data_dir`` (default: a fresh
    temp dir) then only holds this process's partial uploads and cached copies.
    ``create_bucket``: create the S3 bucket when absent (``soppu-registry init``).
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, database: str | None = None,
                 blobs: str | None = None, create_bucket: bool = False):
        if data_dir is None and (database is None or blobs is None):
            raise ValueError("a data dir is needed unless both --database and --blobs are given")
        self.root = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="soppu-registry-"))
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db: Database = SqliteDatabase(self.root / "registry.sqlite3") if database is None else open_database(database)
        self.blobs: BlobStore = DirBlobStore(self.root / "blobs" / "sha256") if blobs is None else \
            open_blobs(blobs, self.root / "cache", create_bucket=create_bucket)
        self.backend = ("postgres" if database else "sqlite") + "+" + ("s3" if blobs else "dir")
        self.db.create_schema(SCHEMA)
        self._migrate()

    def describe(self) -> str:
        """Where the state lives, passwords hidden (for logs and --json output)."""
        return f"{self.backend}: database {redact(self.db.url)}, blobs {redact(self.blobs.url)}"

    def _migrate(self) -> None:
        """Bring an older store to ``SCHEMA_VERSION`` in one write transaction (idempotent; safe with
        servers of this version running: they wait on the write lock, then find it done).

        0 -> 1: ``blob_owners`` appears. A blob listed by a published version belongs to that
        version's owner; blobs no version lists stay unowned (gc removes them; a re-upload claims them).
        1 -> 2: each distinct files list and signature document is stored once (``file_sets``,
        ``file_set_members``, ``signatures``) and ``versions`` rows reference them by digest; the
        per-version copies (``versions.signature``/``files`` and ``version_files``) are dropped.
        """
        if self.db.schema_version() >= SCHEMA_VERSION:  # current: no write lock taken
            return
        with self.tx() as db:
            old = self.db.schema_version()
            if old >= SCHEMA_VERSION:  # another process did it (we hold the lock now)
                return
            if self.db.has_table(db, "version_files"):
                _migrate_inline_versions(db)
            if old < 1:
                db.execute("INSERT INTO blob_owners(sha256, owner, size, touched_at) "
                           "SELECT m.sha256, v.owner, MAX(m.size), ? FROM versions v JOIN file_set_members m "
                           "ON m.files_digest = v.files_digest WHERE true GROUP BY m.sha256, v.owner "
                           "ON CONFLICT DO NOTHING", (time.time(),))
            self.db.set_schema_version(db, SCHEMA_VERSION)

    # -- transactions --------------------------------------------------------------------------
    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """One write transaction, serialized with every other writer (all processes, all replicas)."""
        with self.db.tx() as db:
            yield db

    def read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return self.db.read(sql, args)

    def cleanup_tmp(self) -> int:
        """Remove partial uploads left by a crash; call only while no server writes here."""
        n = 0
        for p in self.tmp_dir.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        return n

    def integrity_check(self) -> str:
        return self.db.integrity_check()

    # -- blobs -------------------------------------------------------------------------------
    def blob_path(self, hex_digest: str) -> Path:
        """A local file with the blob's bytes, for the checks (S3: a verified cached copy)."""
        return self.blobs.local_path(hex_digest)

    def blob_size(self, hex_digest: str) -> int | None:
        st = self.blobs.stat(hex_digest)
        return None if st is None else st[0]

    def owned_blob_sizes(self, owner: str, digests: list[str]) -> dict[str, int | None]:
        """For each digest: its stored size if ``owner`` owns it, else None. Set-based: one query
        per ``IN_CHUNK`` digests, no write lock (see ``_owned_sizes``); for the publish checks."""
        return self._owned_sizes(self.db, owner, digests)

    def _owned_sizes(self, db: Tx | Database, owner: str, digests: list[str]) -> dict[str, int | None]:
        """Stored sizes of the blobs in ``digests`` that ``owner`` owns (None: not owned, or gone).

        The size comes from ``blob_owners``: every row there was written after the stored copy's
        size was confirmed (``BlobWriter.commit``, inside the write transaction), and a blob is
        deleted only together with all its owner rows (gc, in one transaction), so a row means the
        blob is stored with that size. A directory store is stat'ed as well (local, cheap); an S3
        store is not HEADed per object (a round trip each, under the write lock)."""
        owned = {r[0]: int(r[1]) for r in select_in(
            db, "SELECT sha256, size FROM blob_owners WHERE owner = ? AND sha256 IN (?*)", (owner,), digests)}
        out: dict[str, int | None] = {h: owned.get(h) for h in digests}
        if self.blobs.local_stat:
            for h, size in out.items():
                if size is not None:
                    out[h] = self.blob_size(h)
        return out

    def blob_owners(self, hex_digest: str) -> set[str]:
        """Owners that uploaded (or proved possession of) this blob."""
        return {r["owner"] for r in self.read("SELECT owner FROM blob_owners WHERE sha256 = ?", (hex_digest,))}

    def owns_blob(self, owner: str, hex_digest: str) -> bool:
        return bool(self.read("SELECT 1 FROM blob_owners WHERE sha256=? AND owner=?", (hex_digest, owner)))

    def unpublished_bytes(self, owner: str, *, exclude: str | None = None) -> int:
        """Bytes counted against ``owner``'s quota (see ``unpublished_bytes``)."""
        return int(self.read(_UNPUBLISHED, (owner, exclude or ""))[0][0])

    def quota_room(self, owner: str, hex_digest: str, quota: int | None) -> int | None:
        """Bytes ``owner`` may still upload as ``hex_digest`` under ``quota``; None when unbounded
        (no quota, or the owner already owns the blob: storing it again adds nothing)."""
        if quota is None or self.owns_blob(owner, hex_digest):
            return None
        return quota - self.unpublished_bytes(owner, exclude=hex_digest)

    def touch_blob(self, hex_digest: str, owner: str) -> None:
        """Restart the gc grace period of a blob and of ``owner``'s claim on it (one of its owners
        just asked for it); another caller's HEAD must not keep a blob alive."""
        with self.tx() as db:
            if db.execute("UPDATE blob_owners SET touched_at = ? WHERE sha256 = ? AND owner = ?",
                          (time.time(), hex_digest, owner)).rowcount == 0:
                return
        self.blobs.touch(hex_digest)  # outside the lock: gc also keeps a blob whose owner row is fresh

    def gc_blobs(self, grace_seconds: float, *, dry_run: bool = False,
                 now: float | None = None) -> dict[str, Any]:
        """Remove blobs that no published version lists and that nobody touched for ``grace_seconds``
        (the stored copy's mtime and every owner's ``touched_at`` older than that), with their owner
        rows; then owners' stale claims: an owner's row on a blob that none of its versions lists,
        untouched for ``grace_seconds`` (the blob stays while others keep it).

        Returns {"removed": [hex...], "bytes": freed, "kept_referenced": n, "kept_recent": n,
        "released_claims": n, "dry_run": bool}. Safe while servers run (any number of replicas):
        each removal is decided (a fresh stat of the stored copy) and done inside a write
        transaction, serialized with uploads and publishes.
        """
        now = now if now is not None else time.time()
        removed, freed, referenced, recent = [], 0, 0, 0
        for hexd in list(self.blobs.list()):
            with self.tx() as db:
                if db.execute("SELECT 1 FROM file_set_members m JOIN versions v ON v.files_digest = m.files_digest "
                              "WHERE m.sha256 = ? LIMIT 1", (hexd,)).fetchone():
                    referenced += 1
                    continue
                st = self.blobs.stat(hexd)
                if st is None:
                    continue
                touched = db.execute("SELECT MAX(touched_at) FROM blob_owners WHERE sha256=?", (hexd,)).fetchone()[0]
                if now - max(st[1], float(touched or 0.0)) < grace_seconds:
                    recent += 1
                    continue
                if not dry_run:
                    db.execute("DELETE FROM blob_owners WHERE sha256 = ?", (hexd,))
                    self.blobs.delete(hexd)
                removed.append(hexd)
                freed += st[0]
        stale = ("FROM blob_owners WHERE touched_at < ? AND NOT "
                 + _LISTED_BY.format(sha="blob_owners.sha256", owner="blob_owners.owner"))
        with self.tx() as db:
            if dry_run:
                released = db.execute(f"SELECT COUNT(*) {stale}", (now - grace_seconds,)).fetchone()[0]
            else:
                released = db.execute(f"DELETE {stale}", (now - grace_seconds,)).rowcount
        return {"removed": removed, "bytes": freed, "kept_referenced": referenced, "kept_recent": recent,
                "released_claims": int(released), "dry_run": dry_run}

    def blob_writer(self, hex_digest: str, expected_size: int | None, max_bytes: int, owner: str,
                    quota: int | None = None, room: int | None = None) -> BlobWriter:
        """A writer for one upload by ``owner``; ``quota`` (None: none) bounds its unpublished bytes,
        ``room`` is what the quota left when the upload started (checked while streaming)."""
        return BlobWriter(self, hex_digest, expected_size, max_bytes, owner, quota, room)

    def read_blob(self, hex_digest: str) -> bytes:
        return self.blobs.local_path(hex_digest).read_bytes()

    def blob_referenced_by(self, hex_digest: str) -> set[str]:
        """Owners with at least one published version listing this blob."""
        rows = self.read("SELECT DISTINCT v.owner FROM file_set_members m JOIN versions v "
                         "ON v.files_digest = m.files_digest WHERE m.sha256 = ?", (hex_digest,))
        return {r["owner"] for r in rows}

    # -- owners and keys ---------------------------------------------------------------------
    def create_owner(self, owner: str) -> None:
        if not OWNER_RE.match(owner):
            raise ApiError(400, "bad_owner", f"owner name {owner!r} must match {OWNER_RE.pattern}")
        with self.tx() as db:
            if db.execute("SELECT 1 FROM owners WHERE name = ?", (owner,)).fetchone():
                raise ApiError(409, "owner_exists", f"owner {owner!r} already exists")
            db.execute("INSERT INTO owners(name, created_at) VALUES (?, ?)", (owner, utcnow()))

    def owner_exists(self, owner: str) -> bool:
        return bool(self.read("SELECT 1 FROM owners WHERE name = ?", (owner,)))

    def add_key(self, owner: str, key_id: str, public_key_b64: str, *, replaces: str | None = None,
                proof: dict[str, Any] | None = None) -> None:
        """Register an owner's first key, or (``replaces``) rotate the active key atomically, keeping
        the rotation ``proof`` (already verified by the caller) for hosts that trust on first use."""
        with self.tx() as db:
            if not db.execute("SELECT 1 FROM owners WHERE name = ?", (owner,)).fetchone():
                raise ApiError(404, "unknown_owner", f"owner {owner!r} does not exist; create it first")
            row = db.execute("SELECT owner FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is not None:
                raise ApiError(409, "key_exists", f"key {key_id} is already registered (owner {row['owner']!r})")
            active = [r["key_id"] for r in db.execute(
                "SELECT key_id FROM keys WHERE owner = ? AND rotated_at IS NULL", (owner,))]
            if replaces is None and active:
                raise ApiError(409, "key_exists", f"owner {owner!r} already has key {active[0]}; use rotate-key with a proof signed by it")
            if replaces is not None:
                if replaces not in active:
                    raise ApiError(403, "unknown_key", f"key {replaces} is not an active key of owner {owner!r}")
                db.execute("UPDATE keys SET rotated_at = ?, replaced_by = ? WHERE key_id = ?", (utcnow(), key_id, replaces))
            db.execute("INSERT INTO keys(key_id, owner, public_key, created_at) VALUES (?, ?, ?, ?)",
                       (key_id, owner, public_key_b64, utcnow()))
            if replaces is not None and proof is not None:
                db.execute("INSERT INTO key_rotations(new_key_id, owner, proof) VALUES (?, ?, ?)",
                           (key_id, owner, json.dumps(proof, sort_keys=True)))

    def keys(self, owner: str) -> list[dict[str, Any]]:
        """The owner's keys, oldest first; ``rotation_proof``: the proof signed by the key it
        replaced (None for a first key, or one rotated before proofs were kept)."""
        rows = self.read("SELECT k.*, r.proof FROM keys k LEFT JOIN key_rotations r ON r.new_key_id = k.key_id "
                         "WHERE k.owner = ? ORDER BY k.created_at", (owner,))
        return [{"key_id": r["key_id"], "public_key": r["public_key"],
                 "status": "active" if r["rotated_at"] is None else "rotated",
                 "created_at": r["created_at"], "rotated_at": r["rotated_at"],
                 "replaced_by": r["replaced_by"],
                 "rotation_proof": json.loads(r["proof"]) if r["proof"] else None} for r in rows]

    def key_owner(self, key_id: str) -> tuple[str, bool] | None:
        """(owner, active) for a registered key id, or None."""
        rows = self.read("SELECT owner, rotated_at FROM keys WHERE key_id = ?", (key_id,))
        return (rows[0]["owner"], rows[0]["rotated_at"] is None) if rows else None

    # -- tokens ------------------------------------------------------------------------------
    def add_token(self, token_id: str, token_hash: str, owner: str | None, scopes: list[str], label: str | None) -> None:
        with self.tx() as db:
            if owner is not None and not db.execute("SELECT 1 FROM owners WHERE name = ?", (owner,)).fetchone():
                raise ApiError(404, "unknown_owner", f"owner {owner!r} does not exist; create it first")
            db.execute("INSERT INTO tokens(token_id, token_hash, owner, scopes, label, created_at) VALUES (?,?,?,?,?,?)",
                       (token_id, token_hash, owner, ",".join(scopes), label, utcnow()))

    def token(self, token_id: str) -> Any | None:
        rows = self.read("SELECT * FROM tokens WHERE token_id = ?", (token_id,))
        return rows[0] if rows else None

    def revoke_token(self, token_id: str) -> None:
        with self.tx() as db:
            cur = db.execute("UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL", (utcnow(), token_id))
            if cur.rowcount == 0:
                raise ApiError(404, "unknown_token", f"no active token with id {token_id!r}")

    def list_tokens(self) -> list[dict[str, Any]]:
        return [{k: r[k] for k in ("token_id", "owner", "scopes", "label", "created_at", "revoked_at")}
                for r in self.read("SELECT * FROM tokens ORDER BY created_at")]

    # -- versions ----------------------------------------------------------------------------
    def publish(self, owner: str, name: str, version: int, base_model: str,
                signature_doc: dict[str, Any], files: list[dict[str, Any]]) -> int:
        """Insert a checked version in one transaction. Returns 201 (new) or 200 (identical).

        Raises ApiError 409 ``conflict`` (same version, other files) or ``rollback``
        (a version not above the latest, with files not already published as it).
        """
        return self.publish_bundle(owner, [name], version, base_model, signature_doc, files)[name]

    def publish_bundle(self, owner: str, names: list[str], version: int, base_model: str,
                       signature_doc: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, int]:
        """Insert the checked version of every adapter in ``names`` in ONE transaction; returns
        name -> 201 (new) or 200 (identical). All or nothing: the first 409 ``conflict`` /
        ``rollback`` (or a blob gc removed since the checks) rolls back every row of the batch."""
        ident = files_digest(files)
        with self.tx() as db:
            out = self._version_statuses(db, owner, names, version, ident)
            if 201 not in out.values():
                return out
            sizes = self._owned_sizes(db, owner, [f["sha256"] for f in files])
            for f in files:  # gc may have removed a blob or a claim since check_blobs: re-check inside the tx
                if sizes[f["sha256"]] != int(f["size"]):
                    raise ApiError(400, "missing_blob", f"{f['path']} (sha256:{f['sha256']}) was not uploaded")
            _store_file_set(db, ident, files)
            sig = _store_signature(db, json.dumps(signature_doc, sort_keys=True))
            published_at = utcnow()
            db.executemany("INSERT INTO versions(owner,name,version,base_model,files_digest,sig_digest,published_at) "
                           "VALUES (?,?,?,?,?,?,?)",
                           [(owner, name, version, base_model, ident, sig, published_at)
                            for name, status in out.items() if status == 201])
        return out

    @staticmethod
    def _version_statuses(db: Tx, owner: str, names: list[str], version: int, ident: str) -> dict[str, int]:
        """Per name: 200 if this exact version is published with these files, 201 if it may be
        inserted; else (the first, in ``names`` order) 409 ``conflict`` (same version, other files)
        or ``rollback`` (not above the latest). Two set-based queries for all names."""
        same = {r["name"]: r["files_digest"] for r in select_in(
            db, "SELECT name, files_digest FROM versions WHERE owner=? AND version=? AND name IN (?*)",
            (owner, version), names)}
        latest = {r["name"]: r["v"] for r in select_in(
            db, "SELECT name, MAX(version) AS v FROM versions WHERE owner=? AND name IN (?*) GROUP BY name",
            (owner,), names)}
        out: dict[str, int] = {}
        for name in names:
            if name in same:
                if same[name] != ident:
                    raise ApiError(409, "conflict", f"{owner}/{name} version {version} is already published with other content")
                out[name] = 200
            elif latest.get(name) is not None and version <= latest[name]:
                raise ApiError(409, "rollback", f"{owner}/{name} version {version} is not above the latest published version {latest[name]}")
            else:
                out[name] = 201
        return out

    def get_version(self, owner: str, name: str, version: int | None = None) -> dict[str, Any] | None:
        sql = ("SELECT v.owner, v.name, v.version, v.base_model, v.published_at, fs.files, s.doc FROM versions v "
               "JOIN file_sets fs ON fs.files_digest = v.files_digest JOIN signatures s ON s.sig_digest = v.sig_digest "
               "WHERE v.owner=? AND v.name=? ")
        if version is None:
            rows = self.read(sql + "ORDER BY v.version DESC LIMIT 1", (owner, name))
        else:
            rows = self.read(sql + "AND v.version=?", (owner, name, version))
        if not rows:
            return None
        r = rows[0]
        return {"owner": r["owner"], "name": r["name"], "version": r["version"], "base_model": r["base_model"],
                "signature": json.loads(r["doc"]), "files": json.loads(r["files"]),
                "published_at": r["published_at"]}

    def get_version_ref(self, owner: str, name: str, version: int | None = None) -> dict[str, Any] | None:
        """A version as :meth:`get_version` without its files list and signature document, which it
        names by digest (``sig_digest``): one row, no JSON of the bundle's size."""
        sql = ("SELECT owner, name, version, base_model, published_at, sig_digest FROM versions "
               "WHERE owner=? AND name=? ")
        if version is None:
            rows = self.read(sql + "ORDER BY version DESC LIMIT 1", (owner, name))
        else:
            rows = self.read(sql + "AND version=?", (owner, name, version))
        return dict(rows[0]) if rows else None

    def signature_doc(self, hex_digest: str) -> tuple[list[str], str] | None:
        """(the owners whose published versions reference signature document ``hex_digest``, its
        stored text, whose sha256 is that digest), or None."""
        owners = [r["owner"] for r in self.read("SELECT DISTINCT owner FROM versions WHERE sig_digest = ?",
                                                (hex_digest,))]
        if not owners:
            return None
        rows = self.read("SELECT doc FROM signatures WHERE sig_digest = ?", (hex_digest,))
        return (owners, rows[0]["doc"]) if rows else None

    def list_versions(self, owner: str, name: str) -> list[int]:
        return [r["version"] for r in self.read("SELECT version FROM versions WHERE owner=? AND name=? ORDER BY version", (owner, name))]

    def bases(self, base_model: str) -> list[dict[str, Any]]:
        """Basis blobs (``BASIS``) of published versions for ``base_model``, with who uses them."""
        rows = self.read(
            "SELECT m.sha256, m.size, v.owner, v.name, v.version FROM versions v JOIN file_set_members m "
            "ON m.files_digest = v.files_digest "
            "WHERE v.base_model=? AND m.path=? ORDER BY m.sha256, v.owner, v.name, v.version",
            (base_model, BASIS))
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            b = out.setdefault(r["sha256"], {"digest": f"sha256:{r['sha256']}", "size": r["size"], "used_by": []})
            b["used_by"].append({"owner": r["owner"], "name": r["name"], "version": r["version"]})
        return list(out.values())


_VERSIONS_V2 = """CREATE TABLE versions_v2 (
    owner TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, base_model TEXT NOT NULL,
    files_digest TEXT NOT NULL, sig_digest TEXT NOT NULL, published_at TEXT NOT NULL,
    PRIMARY KEY (owner, name, version))"""


def _migrate_inline_versions(db: Tx, batch: int = 200) -> None:
    """Schema 1 -> 2 inside the caller's write transaction: move each version's inline files list and
    signature into ``file_sets``/``file_set_members``/``signatures`` (once per distinct digest),
    rebuild ``versions`` without the inline columns, drop ``version_files``. Reads the old rows in
    key order, ``batch`` at a time (a signature document can be ~150 KB)."""
    db.execute(_VERSIONS_V2)
    cols = "owner, name, version, base_model, files_digest, signature, files, published_at"
    rows = db.execute(f"SELECT {cols} FROM versions ORDER BY owner, name, version LIMIT ?", (batch,)).fetchall()
    while rows:
        moved = []
        for r in rows:
            _store_file_set(db, r["files_digest"], json.loads(r["files"]))
            sig = _store_signature(db, json.dumps(json.loads(r["signature"]), sort_keys=True))
            moved.append((r["owner"], r["name"], r["version"], r["base_model"], r["files_digest"], sig, r["published_at"]))
        db.executemany("INSERT INTO versions_v2(owner, name, version, base_model, files_digest, sig_digest, "
                       "published_at) VALUES (?,?,?,?,?,?,?)", moved)
        last = rows[-1]
        rows = db.execute(f"SELECT {cols} FROM versions WHERE (owner, name, version) > (?, ?, ?) "
                          "ORDER BY owner, name, version LIMIT ?", (last["owner"], last["name"], last["version"], batch)).fetchall()
    db.execute("DROP TABLE versions")
    db.execute("DROP TABLE version_files")
    db.execute("ALTER TABLE versions_v2 RENAME TO versions")
    db.execute("CREATE INDEX IF NOT EXISTS versions_files ON versions(files_digest, owner)")
