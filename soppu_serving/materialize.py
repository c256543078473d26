"""Resolve, verify, download and materialize one adapter version from a SOPPU registry.

The checks are :mod:`soppu_client.fetch`'s (the one resolve + verify + download path); this module
adds the cache around them. Nothing reaches the cache before all checks pass:

1. ``resolve``: the version record, with the request's token (reused ``resolve_ttl`` seconds in
   this process, so LoRAX's several calls for one request cost one round trip).
2. :func:`verified_version`, on every resolution, warm or cold: the owner's key (``trusted_keys``
   dir of pinned keys, else the registry's key the signature names, reused ``resolve_ttl``
   seconds), the Ed25519 signed statement and its expiry against the clock; then rollback
   protection: an unpinned ``owner/name`` whose answer is below the highest version this host has
   verified (``Cache.highest_seen``) is refused (``VerificationError`` code ``rollback``), and the
   mark is raised to every verified version. A complete cached dir is then served only if the
   files it was built from are still the signed ones (:func:`verified_dir`). So an expired
   statement, a version the registry no longer serves (404), or a key that is no longer pinned
   (or no longer listed by the registry) stops a cached adapter from being served too.
3. Under the version's lock, and one lock per signed blob: ``fetch_verified`` brings manifest.json,
   basis and the adapter's core into a staging dir (blobs already in the cache's blob store are
   re-hashed and reused, not downloaded; a basis shared by many adapters is fetched once).
4. Tensors are validated (``Bundle.open``, ``validate_safetensors`` with the shapes the manifest
   implies) and the adapter is written in the cache's serving form: a standard PEFT dir
   (``soppu_client.format.bundle.export_peft``) or a compressed dir
   (``soppu_client.format.compressed_form``, for LoRAX's compressed mode).
5. The verified blobs enter the blob store (a compressed dir's cluster basis is stored once and
   hard-linked) and the dir is renamed into ``<root>/<owner>/<name>/v<N>`` (compressed: under
   ``<root>/.compressed``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from filelock import Timeout

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from soppu_client.fetch import (Explain, VerifiedVersion, VersionRecord, fetch_verified, owner_key, resolve_version,
                                verify_version)
from soppu_client.format import signing
from soppu_client.format.bundle import Bundle, export_peft
from soppu_client.format.compressed_form import BASIS_FILE, write_compressed_files
from soppu_client.format.errors import BundleError, InputError, RegistryError, SoppuError, VerificationError
from soppu_client.format.fsutil import fsync_dir, fsync_tree, link_or_copy
from soppu_client.format.names import BASIS, MANIFEST, SOURCE_MARKER_FORMAT, core_path
from soppu_client.format.refs import AdapterRef
from soppu_client.registry_client import RegistryClient

from soppu_serving.cache import MARKER, Cache
from soppu_serving.settings import Settings

__all__ = ["FetchStats", "forget_resolutions", "materialize", "resolve", "verified_dir", "verified_version"]

SUBJECT = "soppu adapter"  # how every error of the source names the adapter


@dataclass
class FetchStats:
    """What one materialization did (for tests and benchmarks)."""

    materialized: bool = False  # this call built the version dir
    blobs_downloaded: list[str] = field(default_factory=list)  # paths fetched over the network
    bytes_downloaded: int = 0
    blobs_reused: list[str] = field(default_factory=list)  # paths served from the blob store


# -- registry access ------------------------------------------------------------------------------

def _client(settings: Settings, token: str | None) -> RegistryClient:
    return RegistryClient(settings.require_registry_url(), token, backoff=0.2, max_wait=2.0,
                          **settings.client_options())


def _explain(err: RegistryError, what: str, *, ref: AdapterRef, url: str) -> SoppuError:
    """Turn a registry refusal into a message a LoRAX client can act on."""
    if err.status is None and err.code in ("deadline", "response_too_large", "bad_response"):
        return RegistryError(f"soppu adapter {ref}: refused the registry's answer while {what}: {err}",
                             status=None, code=err.code, url=err.url)
    if err.status is None:
        return RegistryError(
            f"soppu adapter {ref}: cannot reach the registry at {url} ({what}): {err}. "
            "Check SOPPU_REGISTRY_URL and that the registry is running.",
            status=None, code="unreachable", url=err.url,
        )
    if err.status == 401:
        return RegistryError(
            f"soppu adapter {ref}: the registry at {url} rejected the token ({err}). "
            "Send a valid registry token as the request's api_token (or set SOPPU_REGISTRY_TOKEN).",
            status=401, code=err.code, url=err.url,
        )
    if err.status == 403:
        return RegistryError(
            f"soppu adapter {ref}: the token may not read adapters of owner {ref.owner!r} ({err}). "
            "Use an owner-read token of that owner or a serving-read token.",
            status=403, code=err.code, url=err.url,
        )
    if err.status == 404:
        which = f"version {ref.version} of" if ref.version is not None else "version of"
        return RegistryError(
            f"soppu adapter {ref}: unknown adapter: the registry at {url} has no published {which} "
            f"{ref.owner}/{ref.name} ({err})",
            status=404, code=err.code, url=err.url,
        )
    return RegistryError(f"soppu adapter {ref}: registry error while {what}: {err}", status=err.status,
                         code=err.code, url=err.url)


def _explainer(ref: AdapterRef, client: RegistryClient) -> Explain:
    return functools.partial(_explain, ref=ref, url=client.base_url)


_resolve_cache: dict[tuple[str, str, str], tuple[float, VersionRecord]] = {}
_key_cache: dict[tuple[str, str, str, str], tuple[float, Ed25519PublicKey]] = {}
_resolve_lock = threading.Lock()


def _remember(table: dict, key: tuple, value: Any, now: float, ttl: float) -> None:
    """Put ``value`` in ``table`` (bounded: drop what has expired, else everything). Hold ``_resolve_lock``."""
    if len(table) >= 4096:
        for k in [k for k, (t, _) in table.items() if now - t >= ttl] or list(table):
            del table[k]
    table[key] = (now, value)


def resolve(ref: AdapterRef, settings: Settings, token: str | None) -> VersionRecord:
    """The version record of ``ref`` (every call checks the token, but results live
    ``settings.resolve_ttl`` seconds in this process: LoRAX's several calls for one request cost
    one round trip)."""
    url, ttl = settings.require_registry_url(), settings.resolve_ttl
    key = (url, str(ref), hashlib.sha256((token or "").encode()).hexdigest())
    now = time.monotonic()
    with _resolve_lock:
        hit = _resolve_cache.get(key)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
    client = _client(settings, token)
    record = resolve_version(client, ref, subject=SUBJECT, explain=_explainer(ref, client))
    with _resolve_lock:
        _remember(_resolve_cache, key, record, now, ttl)
        if ref.version is None:  # the same record answers the pinned lookup of that version
            pinned = AdapterRef(ref.owner, ref.name, record.version)
            _remember(_resolve_cache, (url, str(pinned), key[2]), replace(record, ref=pinned), now, ttl)
    return record


def forget_resolutions() -> None:
    """Forget every reused version record and registry key of this process."""
    with _resolve_lock:
        _resolve_cache.clear()
        _key_cache.clear()


def _registry_key(client: RegistryClient, record: VersionRecord, settings: Settings, token: str | None,
                  explain: Explain) -> Ed25519PublicKey:
    """The registry's key for ``record``'s signature, reused ``resolve_ttl`` seconds (unpinned mode)."""
    key_id = record.signature.get("key_id")
    key = (client.base_url, record.ref.owner, str(key_id), hashlib.sha256((token or "").encode()).hexdigest())
    now = time.monotonic()
    with _resolve_lock:
        hit = _key_cache.get(key)
        if hit is not None and now - hit[0] < settings.resolve_ttl:
            return hit[1]
    pub = owner_key(client, record, explain=explain)
    with _resolve_lock:
        _remember(_key_cache, key, pub, now, settings.resolve_ttl)
    return pub


def verified_version(ref: AdapterRef, *, token: str | None, settings: Settings, cache: Cache,
                     record: VersionRecord | None = None) -> VerifiedVersion:
    """One resolution of ``ref``, warm or cold: its version record (``record``, else :func:`resolve`),
    verified now (the owner's key, the signature, the expiry against the clock), not a rollback.

    Rollback: for an unpinned ``ref`` the answered version must be at least the highest this host
    has verified for ``owner/name`` (VerificationError ``rollback``, naming both versions and the
    fix); a pinned ``owner/name@N`` is served below it. Every verified version raises the mark.
    """
    record = record or resolve(ref, settings, token)
    client = _client(settings, token)
    explain = _explainer(ref, client)
    pub = None if settings.trusted_keys is not None else _registry_key(client, record, settings, token, explain)
    verified = verify_version(client, record, public_key=pub, trusted_keys=settings.trusted_keys, explain=explain)
    owner, name, version = ref.owner, ref.name, record.version
    seen = cache.highest_seen(owner, name)
    if ref.version is None and seen is not None and version < seen:
        raise VerificationError(
            f"{SUBJECT} {ref}: rollback refused: the registry at {client.base_url} answers version {version} as the "
            f"latest, but this host has already verified version {seen} of {owner}/{name}. Ask for "
            f"{owner}/{name}@{version} to serve that version on purpose; if the owner withdrew the newer versions, "
            f"delete {cache.seen_path(owner, name)}", code="rollback")
    cache.note_seen(owner, name, version, hashlib.sha256(signing.canonical_json(verified.statement)).hexdigest())
    return verified


def verified_dir(ref: AdapterRef, *, token: str | None, settings: Settings, cache: Cache,
                 record: VersionRecord | None = None) -> tuple[Path, VerifiedVersion]:
    """The version dir one resolution of ``ref`` serves (:func:`verified_version`), and the verified
    version; when the dir is complete, it was built from files the statement still signs."""
    verified = verified_version(ref, token=token, settings=settings, cache=cache, record=record)
    final = cache.version_dir(ref.owner, ref.name, verified.record.version)
    if cache.is_complete(final):
        _check_cached(final, verified)
    return final, verified


def _provenance(url: str, verified: VerifiedVersion, files: list[dict[str, Any]]) -> dict:
    record, statement = verified.record, verified.statement
    return {
        "format": SOURCE_MARKER_FORMAT,
        "registry": url,
        "owner": record.ref.owner,
        "name": record.ref.name,
        "version": record.version,
        "key_id": record.signature.get("key_id"),
        "statement_sha256": hashlib.sha256(signing.canonical_json(statement)).hexdigest(),
        "expires_at": statement["expires_at"],
        "base_model": statement["base_model"],
        "files": files,
        "materialized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_cached(final: Path, verified: VerifiedVersion) -> None:
    """A cached dir is served only if the files it was built from are still the signed ones."""
    try:
        recorded = json.loads((final / MARKER).read_text(encoding="utf-8"))["files"]
        used = {(f["path"], f["sha256"], f["size"]) for f in recorded}
    except (OSError, ValueError, KeyError, TypeError):
        used = None
    signed = {(f["path"], f["sha256"], f["size"]) for f in verified.statement["files"]}
    if used is None or not used <= signed:
        raise VerificationError(
            f"{verified.label}: the cached copy in {final} was built from files the current signed "
            "statement does not list; remove that directory to fetch it again"
        )


def materialize(ref: AdapterRef, *, token: str | None, settings: Settings, cache: Cache,
                record: VersionRecord | None = None, lock_timeout: float = 600.0) -> tuple[Path, FetchStats]:
    """Make ``<cache>/<owner>/<name>/v<N>`` a complete, verified dir in the cache's form; returns (dir, stats).

    ``record``: the version record when the caller resolved it already. Safe to call from many
    processes or threads at once: the work is done once under the version's lock and every caller
    returns only after the complete dir is in place.
    """
    # Verified (key, signature, expiry, rollback) before any byte is written, and on every warm hit.
    final, verified = verified_dir(ref, token=token, settings=settings, cache=cache, record=record)
    client = _client(settings, token)
    explain = _explainer(ref, client)
    version = verified.record.version
    stats = FetchStats()
    if not cache.is_complete(final):
        try:
            with cache.version_lock(ref.owner, ref.name, version, timeout=lock_timeout):
                if not cache.is_complete(final):  # else another process finished while we waited
                    _build(verified, client, explain, cache, final, stats)
                    stats.materialized = True
        except Timeout:
            raise RegistryError(f"{verified.label}: timed out after {lock_timeout:.0f}s waiting for another process "
                                "to materialize it", code="lock_timeout") from None
    if ref.version is None:
        cache.set_latest(ref.owner, ref.name, version)
    return final, stats


def _build(verified: VerifiedVersion, client: RegistryClient, explain: Explain, cache: Cache, final: Path,
           stats: FetchStats) -> None:
    """Fetch, validate and export one version into staging, store its blobs, rename the dir in."""
    record, label = verified.record, verified.label
    name = record.ref.name
    core = core_path(name)
    entries = verified.entries([MANIFEST, BASIS, core])
    with cache.staging(f"{record.ref.owner}--{name}--v{record.version}") as stage, ExitStack() as locks:
        # One lock per blob (sorted: no deadlock), held until the blobs are stored: processes
        # fetching adapters that share a basis download it once.
        for digest in sorted({e["sha256"] for e in entries}):
            locks.enter_context(cache.blob_lock(digest))
        fetched = fetch_verified(client, verified, [BASIS, core], stage / "bundle", reuse=cache.cached_blob,
                                 adapter=name, explain=explain)
        stats.blobs_downloaded, stats.blobs_reused = fetched.downloaded, fetched.reused
        stats.bytes_downloaded = fetched.bytes_downloaded
        out = stage / cache.form
        try:
            bundle = Bundle.open(fetched.dir, verify_digests=False)  # digests checked by fetch_verified
            if cache.form == "compressed":
                out.mkdir()
                derived_basis = write_compressed_files(bundle, name, out)["basis"]
            else:
                export_peft(bundle, name, out)
        except (BundleError, InputError, VerificationError) as e:
            raise VerificationError(f"{label}: bundle failed validation: {e}") from None
        (out / MARKER).write_text(
            json.dumps(_provenance(client.base_url, verified, entries), indent=2, sort_keys=True)
            + "\n", encoding="utf-8")
        # Everything verified and exported: only now does anything enter the cache.
        for digest, path in fetched.fresh.items():
            cache.store_blob(path, digest)
        if cache.form == "compressed":
            _share_basis(cache, out / BASIS_FILE, derived_basis["sha256"], derived_basis["size"])
        fsync_tree(out)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, final)  # the dir appears complete, or not at all
        fsync_dir(final.parent)


def _share_basis(cache: Cache, written: Path, sha256: str, size: int) -> None:
    """Replace a compressed dir's basis file by a hard link to the one copy in the blob store.

    Adapters of one cluster get byte-identical basis files, so the disk holds each cluster's basis
    once however many adapters use it (the file in the dir is still a plain, complete file)."""
    with cache.blob_lock(sha256):
        stored = cache.cached_blob(sha256, size)
        if stored is None:
            stored = cache.store_blob(written, sha256)
        else:
            written.unlink()
        link_or_copy(stored, written)
