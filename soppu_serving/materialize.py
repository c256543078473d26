"""Resolve, verify, download and materialize one adapter version from a SOPPU registry.

Order of checks (nothing reaches the cache before all of them pass):

1. ``GET /v1/adapters/<owner>/<name>[/versions/<v>]`` with the request's token -> version record.
2. The owner's key: ``$SOPPU_TRUSTED_KEYS/<owner>.pub`` when that dir is set (pinned keys), else
   ``GET /v1/keys/<owner>``, picking the key the signature names. ``verify_statement`` checks the
   Ed25519 signature, expiry, owner, adapter name and version.
3. manifest.json, basis and the adapter's core are streamed into a staging dir; each file's size
   and sha256 must equal the signed statement's. manifest.json must agree with the statement.
4. Tensors are validated (``validate_safetensors`` with the shapes the manifest implies) and the
   adapter is written in the cache's serving form: a standard PEFT dir
   (``soppu_client.format.bundle.export_peft``) or a compressed dir
   (``soppu_client.format.compressed_form``, for LoRAX's compressed mode).
5. Under the version's file lock the verified blobs enter the blob store (a basis shared by many
   adapters is fetched once; a compressed dir's cluster basis is stored once and hard-linked) and
   the dir is renamed into ``<root>/<owner>/<name>/v<N>`` (compressed: under ``<root>/.compressed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soppu_client.format import signing
from soppu_client.format.bundle import BASIS, MANIFEST, Bundle, core_path, export_peft
from soppu_client.format.errors import (
    BundleError,
    InputError,
    RegistryError,
    SignatureError,
    SoppuError,
    VerificationError,
)
from soppu_client.format.compressed_form import BASIS_FILE, write_compressed_files
from soppu_client.format.fsutil import fsync_tree
from soppu_client.format.refs import AdapterRef
from soppu_client.registry_client import BlobDigestError, RegistryClient

from soppu_serving.cache import MARKER, Cache, fsync_dir

_CHUNK = 1 << 20


@dataclass
class Resolved:
    """A version record from the registry (not yet verified)."""

    ref: AdapterRef
    version: int
    signature: dict[str, Any]
    record: dict[str, Any]


@dataclass
class FetchStats:
    """What one materialization did (for tests and benchmarks)."""

    materialized: bool = False  # this call built the version dir
    blobs_downloaded: list[str] = field(default_factory=list)  # paths fetched over the network
    bytes_downloaded: int = 0
    blobs_reused: list[str] = field(default_factory=list)  # paths served from the blob store


# -- registry access ------------------------------------------------------------------------------

def registry_url() -> str:
    url = os.environ.get("SOPPU_REGISTRY_URL", "").strip()
    if not url:
        raise InputError(
            "SOPPU_REGISTRY_URL is not set: start LoRAX with SOPPU_REGISTRY_URL=http://registry:8080 "
            "to serve adapters of source `soppu`"
        )
    return url.rstrip("/")


def make_client(url: str, token: str | None) -> RegistryClient:
    retries = int(os.environ.get("SOPPU_REGISTRY_RETRIES", "2"))
    timeout = float(os.environ.get("SOPPU_REGISTRY_TIMEOUT", "30"))
    return RegistryClient(url, token, retries=retries, backoff=0.2, max_wait=2.0, timeout=timeout)


def _explain(err: RegistryError, ref: AdapterRef, url: str, what: str) -> SoppuError:
    """Turn a registry refusal into a message a LoRAX client can act on."""
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


_resolve_cache: dict[tuple[str, str, str], tuple[float, Resolved]] = {}
_resolve_lock = threading.Lock()


def resolve(ref: AdapterRef, url: str, token: str | None, *, ttl: float | None = None) -> Resolved:
    """Fetch the version record (every call checks the token, but results live ``ttl`` seconds
    in this process so that LoRAX's several calls for one request cost one round trip)."""
    ttl = float(os.environ.get("SOPPU_RESOLVE_TTL", "5")) if ttl is None else ttl
    key = (url, str(ref), hashlib.sha256((token or "").encode()).hexdigest())
    now = time.monotonic()
    with _resolve_lock:
        hit = _resolve_cache.get(key)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
    client = make_client(url, token)
    try:
        record = client.get_version(ref.owner, ref.name, ref.version)
    except RegistryError as e:
        raise _explain(e, ref, url, "resolving the version") from None
    try:
        version = int(record["version"])
        sig = record["signature"]
        if record.get("owner") != ref.owner or record.get("name") != ref.name or not isinstance(sig, dict):
            raise KeyError("owner/name/signature")
        if ref.version is not None and version != ref.version:
            raise KeyError("version")
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"soppu adapter {ref}: the registry at {url} answered a malformed version record ({e})",
                            code="bad_record") from None
    resolved = Resolved(ref, version, sig, record)
    with _resolve_lock:
        if len(_resolve_cache) >= 4096:  # bounded: drop what has expired, else everything
            for k in [k for k, (t, _) in _resolve_cache.items() if now - t >= ttl] or list(_resolve_cache):
                del _resolve_cache[k]
        _resolve_cache[key] = (now, resolved)
    return resolved


def forget_resolutions() -> None:
    with _resolve_lock:
        _resolve_cache.clear()


def owner_key(ref: AdapterRef, signature_doc: dict[str, Any], url: str, token: str | None) -> Any:
    """The public key to trust for ``ref.owner``: pinned on disk, or the registered one named by key_id."""
    pinned_dir = os.environ.get("SOPPU_TRUSTED_KEYS")
    if pinned_dir:
        path = Path(pinned_dir) / f"{ref.owner}.pub"
        if not path.is_file():
            raise SignatureError(
                f"soppu adapter {ref}: no trusted key for owner {ref.owner!r} in SOPPU_TRUSTED_KEYS "
                f"({path} is missing)"
            )
        return signing.load_public_key(path)
    try:
        return make_client(url, token).registered_key(ref.owner, signature_doc.get("key_id"))
    except RegistryError as e:
        raise _explain(e, ref, url, "fetching the owner's keys") from None
    except SignatureError as e:
        raise SignatureError(f"soppu adapter {ref}: bad signature: {e}") from None


def verify(resolved: Resolved, url: str, token: str | None) -> dict[str, Any]:
    """Check the signed statement against the owner's key; returns the statement."""
    ref = resolved.ref
    pub = owner_key(ref, resolved.signature, url, token)
    try:
        return signing.verify_statement(resolved.signature, pub, owner=ref.owner, adapter=ref.name,
                                        version=resolved.version)
    except SignatureError as e:
        raise SignatureError(f"soppu adapter {ref}@{resolved.version}: bad signature: {e}") from None


# -- download ---------------------------------------------------------------------------------

def _download(client: RegistryClient, ref: AdapterRef, version: int, entry: dict[str, Any], dest: Path,
              url: str) -> None:
    """Stream one blob to ``dest`` and check it against the signed size and sha256."""
    try:
        client.download_blob(entry["sha256"], int(entry["size"]), dest)
    except BlobDigestError as e:
        raise VerificationError(
            f"soppu adapter {ref}@{version}: digest mismatch: the registry served {entry['path']} as {e.served}, "
            f"the signed statement says {entry['size']} bytes with sha256 {entry['sha256']}; refusing it"
        ) from None
    except RegistryError as e:
        raise _explain(e, ref, url, f"downloading {entry['path']}") from None


def _provenance(url: str, resolved: Resolved, statement: dict[str, Any], files: list[dict[str, Any]]) -> dict:
    return {
        "format": "soppu-source/1",
        "registry": url,
        "owner": resolved.ref.owner,
        "name": resolved.ref.name,
        "version": resolved.version,
        "key_id": resolved.signature.get("key_id"),
        "statement_sha256": hashlib.sha256(signing.canonical_json(statement)).hexdigest(),
        "expires_at": statement["expires_at"],
        "base_model": statement["base_model"],
        "files": files,
        "materialized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_cached(final: Path, statement: dict[str, Any], ref: AdapterRef, version: int) -> None:
    """A cached dir is served only if the files it was built from are still the signed ones."""
    try:
        recorded = json.loads((final / MARKER).read_text(encoding="utf-8"))["files"]
        used = {(f["path"], f["sha256"], f["size"]) for f in recorded}
    except (OSError, ValueError, KeyError, TypeError):
        used = None
    signed = {(f["path"], f["sha256"], f["size"]) for f in statement["files"]}
    if used is None or not used <= signed:
        raise VerificationError(
            f"soppu adapter {ref}@{version}: the cached copy in {final} was built from files the current signed "
            "statement does not list; remove that directory to fetch it again"
        )


def materialize(ref: AdapterRef, *, token: str | None, url: str | None = None, cache: Cache | None = None,
                resolved: Resolved | None = None, lock_timeout: float = 600.0) -> tuple[Path, FetchStats]:
    """Make ``<cache>/<owner>/<name>/v<N>`` a complete, verified dir in the cache's form; returns (dir, stats).

    Safe to call from many processes or threads at once: the work is done once under a file lock
    and every caller returns only after the complete dir is in place.
    """
    url = url or registry_url()
    cache = cache or Cache()
    resolved = resolved or resolve(ref, url, token)
    statement = verify(resolved, url, token)  # before any byte is written
    version = resolved.version
    final = cache.version_dir(ref.owner, ref.name, version)
    stats = FetchStats()
    if cache.is_complete(final):
        _check_cached(final, statement, ref, version)
        if ref.version is None:
            cache.set_latest(ref.owner, ref.name, version)
        return final, stats
    from filelock import Timeout

    try:
        with cache.lock(f"adapter-{cache.form}-{ref.owner}--{ref.name}--v{version}", timeout=lock_timeout):
            if cache.is_complete(final):  # another process finished while we waited
                if ref.version is None:
                    cache.set_latest(ref.owner, ref.name, version)
                return final, stats
            _build(ref, resolved, statement, url, token, cache, final, stats)
            if ref.version is None:
                cache.set_latest(ref.owner, ref.name, version)
    except Timeout:
        raise RegistryError(f"soppu adapter {ref}@{version}: timed out after {lock_timeout:.0f}s waiting for "
                            "another process to materialize it", code="lock_timeout") from None
    stats.materialized = True
    return final, stats


def _build(ref: AdapterRef, resolved: Resolved, statement: dict[str, Any], url: str, token: str | None,
           cache: Cache, final: Path, stats: FetchStats) -> None:
    version = resolved.version
    by_path = {f["path"]: f for f in statement["files"]}
    client = make_client(url, token)
    with cache.staging(f"{ref.owner}--{ref.name}--v{version}") as stage:
        bundle_dir = stage / "bundle"
        (bundle_dir / "cores").mkdir(parents=True)
        fresh: dict[str, Path] = {}  # sha256 -> verified file in staging, not yet in the blob store

        def fetch(rel: str) -> Path:
            entry = by_path.get(rel)
            if entry is None:
                raise VerificationError(f"soppu adapter {ref}@{version}: {rel} is not covered by the signed statement")
            if entry["sha256"] in fresh:
                return fresh[entry["sha256"]]
            cached = cache.cached_blob(entry["sha256"], entry["size"])
            if cached is not None:
                stats.blobs_reused.append(rel)
                return cached
            dest = stage / f"blob-{entry['sha256']}"
            _download(client, ref, version, entry, dest, url)
            stats.blobs_downloaded.append(rel)
            stats.bytes_downloaded += entry["size"]
            fresh[entry["sha256"]] = dest
            return dest

        core = core_path(ref.name)
        needed = [MANIFEST, BASIS, core]
        absent = [rel for rel in needed if rel not in by_path]
        if absent:
            raise VerificationError(f"soppu adapter {ref}@{version}: the signed statement does not cover "
                                    f"{', '.join(absent)}")
        with ExitStack() as locks:
            # One lock per blob (sorted: no deadlock), held until the blobs are stored: processes
            # fetching adapters that share a basis download it once.
            for digest in sorted({by_path[rel]["sha256"] for rel in needed}):
                locks.enter_context(cache.lock(f"blob-{digest}"))
            sources = {rel: fetch(rel) for rel in needed}
            try:
                manifest = json.loads(sources[MANIFEST].read_bytes())
            except (ValueError, UnicodeDecodeError) as e:
                raise BundleError(f"soppu adapter {ref}@{version}: manifest.json is not valid JSON ({e})") from None
            signing.check_manifest(manifest, statement, f"soppu adapter {ref}@{version}", [BASIS, core], adapter=ref.name)
            for rel, src in sources.items():
                _link_or_copy(src, bundle_dir / rel)
            out = stage / cache.form
            try:
                bundle = Bundle.open(bundle_dir, verify_digests=False)  # digests checked above
                if cache.form == "compressed":
                    out.mkdir()
                    derived_basis = write_compressed_files(bundle, ref.name, out)["basis"]
                else:
                    export_peft(bundle, ref.name, out)
            except (BundleError, InputError, VerificationError) as e:
                raise VerificationError(f"soppu adapter {ref}@{version}: bundle failed validation: {e}") from None
            files = [by_path[rel] for rel in needed]
            (out / MARKER).write_text(
                json.dumps(_provenance(url, resolved, statement, files), indent=2, sort_keys=True) + "\n",
                encoding="utf-8",
            )
            # Everything verified and exported: only now does anything enter the cache.
            for digest, path in list(fresh.items()):
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
    with cache.lock(f"blob-{sha256}"):
        stored = cache.cached_blob(sha256, size)
        if stored is None:
            stored = cache.store_blob(written, sha256)
        else:
            written.unlink()
        _link_or_copy(stored, written)


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        import shutil

        shutil.copyfile(src, dest)
