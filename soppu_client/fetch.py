"""Fetch a published version from a registry, verified: the one resolve + verify + download path.

Every consumer of published adapters goes through :func:`fetch_verified` (``soppu project
--onto-published`` via :func:`fetch_published_basis`; the serving side's materialization). Its
steps, each passed before the next one starts:

1. resolve (:func:`resolve_version`): the version record ``GET /v1/adapters/<owner>/<name>[/versions/<v>]``,
   which must be for the owner, name and (pinned) version asked for;
2. verify (:func:`verify_version`): the owner's key (:func:`owner_key`) is ``public_key`` when
   given, else one of the owner's pinned keys when a pinned-keys dir is given (see
   :func:`pinned_keys`), else the registered key the signature names (active or rotated; its id
   recomputed from the key bytes); ``signing.verify_statement`` checks the Ed25519 signature,
   expiry (against the clock, on every call), owner, adapter name and version;
3. download: manifest.json and the requested files, streamed with their signed size and sha256
   (constant-time compare) -- or taken from ``reuse`` when the caller already holds a verified
   copy -- and the manifest checked against the statement with ``signing.check_manifest``.

A caller that must act between the steps (the serving side: a cache hit needs only step 2, and
the download runs under locks named by the signed digests) passes what it already has as
``target``: an :class:`AdapterRef` (all steps), a :class:`VersionRecord` (steps 2-3) or a
:class:`VerifiedVersion` (step 3).

Registry refusals become :class:`RegistryError` naming the adapter and the step; ``explain``
replaces that wording (the LoRAX source tells its clients what to send instead). A malformed
answer is a :class:`RegistryError` (code ``bad_record`` / ``bad_response``) naming the field. The
client's caps apply to every step: JSON answers at most ``max_json_bytes``, each blob download at
most its signed size within ``download_deadline`` seconds (:class:`RegistryClient`).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from soppu_client.format import signing
from soppu_client.format.bundle import Bundle, Manifest
from soppu_client.format.fsutil import link_or_copy, staged_dir
from soppu_client.format.names import BASIS, HEX64_RE, MANIFEST
from soppu_client.format.errors import (BundleError, InputError, RegistryError, SignatureError, SoppuError,
                                       VerificationError)
from soppu_client.format.refs import AdapterRef
from soppu_client.known_keys import KnownKeys, choose_key
from soppu_client.registry_client import BlobDigestError, RegistryClient

__all__ = ["Fetched", "VerifiedVersion", "VersionRecord", "fetch_published_basis", "fetch_verified", "owner_key",
           "pinned_keys", "resolve_version", "reuse_verdict", "verify_version"]

# (the refusal, the step: "resolving the version", "fetching the owner's keys", "downloading <path>")
# -> the error to raise instead
Explain = Callable[[RegistryError, str], SoppuError]
# (sha256, size) -> a local file already verified to hold exactly those bytes, or None
Reuse = Callable[[str, int], Path | None]


@dataclass(frozen=True)
class VersionRecord:
    """The registry's version record for ``ref``: well-formed, not yet verified."""

    ref: AdapterRef  # as asked (version None: the latest)
    version: int  # the version the registry answered
    signature: dict[str, Any]  # the signature document (statement, signature, key_id, ...)
    record: dict[str, Any]
    subject: str = "adapter"  # what errors call it: "soppu adapter", "published adapter"
    signature_sha256: str | None = None  # the document's digest, when the registry named it by digest

    @property
    def label(self) -> str:
        """``<subject> owner/name@version``: how every error after resolution names it."""
        return f"{self.subject} {self.ref.owner}/{self.ref.name}@{self.version}"


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose signed statement verified against the owner's key."""

    record: VersionRecord
    statement: dict[str, Any]

    @property
    def label(self) -> str:
        return self.record.label

    def entries(self, paths: Sequence[str]) -> list[dict[str, Any]]:
        """The signed entries (path, sha256, size) of ``paths``; VerificationError naming those not covered."""
        by_path = {f["path"]: f for f in self.statement["files"]}
        absent = [rel for rel in paths if rel not in by_path]
        if absent:
            raise VerificationError(f"{self.label}: the signed statement does not cover {', '.join(absent)}")
        return [by_path[rel] for rel in paths]


@dataclass
class Fetched:
    """What :func:`fetch_verified` wrote: every file at its bundle path under ``dir``."""

    verified: VerifiedVersion
    dir: Path
    manifest: dict[str, Any]
    downloaded: list[str] = field(default_factory=list)  # bundle paths fetched over the network, in order
    reused: list[str] = field(default_factory=list)  # bundle paths taken from ``reuse``
    bytes_downloaded: int = 0
    fresh: dict[str, Path] = field(default_factory=dict)  # sha256 -> file this call downloaded (under ``dir``)
    typed: Manifest | None = None  # the checked manifest

    @property
    def statement(self) -> dict[str, Any]:
        return self.verified.statement


def _refusal(err: RegistryError, what: str, who: str, explain: Explain | None) -> SoppuError:
    if explain is not None:
        return explain(err, what)
    return RegistryError(f"{who}: registry error while {what}: {err}", status=err.status, code=err.code, url=err.url)


def resolve_version(client: RegistryClient, ref: AdapterRef | str, *, subject: str = "adapter",
                    explain: Explain | None = None,
                    signatures: MutableMapping[str, dict[str, Any]] | None = None) -> VersionRecord:
    """Step 1: the version record of ``ref`` (latest when unpinned), checked to be the one asked for.

    ``signatures`` (digest -> signature document, kept by the caller): the record is asked for
    with the signature document by digest, which is taken from ``signatures`` or fetched once
    (its bytes checked against the digest) -- so resolving many adapters of one bundle moves its
    signed statement once. Unverified either way: step 2 verifies the document."""
    if isinstance(ref, str):
        ref = AdapterRef.parse(ref, label=subject)
    sig_sha256 = None
    try:
        record = client.get_version(ref.owner, ref.name, ref.version, signature_ref=signatures is not None)
        by_ref = record.get("signature_sha256")
        if signatures is not None and "signature" not in record and isinstance(by_ref, str) \
                and HEX64_RE.match(by_ref):
            sig_sha256 = by_ref
            doc = signatures.get(by_ref)
            if doc is None:
                doc = client.get_signature(by_ref)
                signatures[by_ref] = doc
            record = {**record, "signature": doc}
    except RegistryError as e:
        raise _refusal(e, "resolving the version", f"{subject} {ref}", explain) from None
    problem = None
    version, sig = record.get("version"), record.get("signature")
    if type(version) is not int or version < 1:
        problem = f"`version` must be an integer >= 1, got {_show(version)}"
    elif ref.version is not None and version != ref.version:
        problem = f"`version` must be {ref.version} (the version asked for), got {version}"
    elif record.get("owner") != ref.owner:
        problem = f"`owner` must be {ref.owner!r}, got {_show(record.get('owner'))}"
    elif record.get("name") != ref.name:
        problem = f"`name` must be {ref.name!r}, got {_show(record.get('name'))}"
    elif not isinstance(sig, dict):
        problem = f"`signature` must be a JSON object, got {_show(sig)}"
    if problem is not None:
        raise RegistryError(f"{subject} {ref}: the registry at {client.base_url} answered a malformed version record: "
                            f"{problem}", code="bad_record")
    return VersionRecord(ref, version, sig, record, subject, sig_sha256)  # type: ignore[arg-type]  # checked above


def _show(value: Any) -> str:
    """A short description of a field's value for an error message (never the whole value)."""
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__}"


def pinned_keys(trusted_keys: str | os.PathLike[str], owner: str) -> dict[str, Path]:
    """The pinned keys of ``owner`` in the dir ``trusted_keys``: key id -> file.

    Two places, both read: ``<dir>/<owner>.pub`` (one key) and ``<dir>/<owner>/*.pub`` (any number:
    keep the old and the new key there while an owner rotates). A per-owner dir, not
    ``<owner>.<x>.pub``: owner names may contain dots, so ``alice.x.pub`` could be owner ``alice.x``'s.
    A file that is not an Ed25519 public key is a SignatureError naming it.
    """
    root = Path(trusted_keys)
    files = [root / f"{owner}.pub"] + sorted((root / owner).glob("*.pub"))
    keys: dict[str, Path] = {}
    for path in files:
        if not path.is_file():
            continue
        try:
            keys.setdefault(signing.public_key_id(signing.load_public_key(path)), path)
        except (InputError, SignatureError, OSError, ValueError) as e:
            raise SignatureError(f"pinned key {path} is not a readable Ed25519 public key ({e}); fix or remove it",
                                 code="untrusted_key") from None
    return keys


def owner_key(client: RegistryClient, rec: VersionRecord, *, trusted_keys: str | os.PathLike[str] | None = None,
              explain: Explain | None = None) -> Ed25519PublicKey:
    """The key ``rec``'s signature must verify with: the pinned key with the id the signature names
    (SignatureError ``untrusted_key`` when the owner has none pinned or not that one), or without
    ``trusted_keys`` the registry's registered key of that id (active or rotated)."""
    return _owner_key(client, rec, None, Path(trusted_keys) if trusted_keys else None, explain)


def _owner_key(client: RegistryClient, rec: VersionRecord, public_key: Ed25519PublicKey | None,
               trusted_keys: Path | None, explain: Explain | None) -> Ed25519PublicKey:
    who = f"{rec.subject} {rec.ref}"
    if public_key is not None:
        return public_key
    owner = rec.ref.owner
    if trusted_keys is not None:
        try:
            pinned = pinned_keys(trusted_keys, owner)
        except SignatureError as e:
            raise SignatureError(f"{who}: {e}", code=e.code) from None
        if not pinned:
            raise SignatureError(f"{who}: no trusted key for owner {owner!r} in the pinned keys dir {trusted_keys} "
                                 f"(neither {Path(trusted_keys) / f'{owner}.pub'} nor "
                                 f"{Path(trusted_keys) / owner}/*.pub exists; add the owner's public key there)",
                                 code="untrusted_key")
        key_id = rec.signature.get("key_id")
        if key_id not in pinned:
            raise SignatureError(f"{rec.label}: bad signature: it names key {_show(key_id)}, which is not a pinned key "
                                 f"of owner {owner!r} (pinned in {trusted_keys}: {', '.join(sorted(pinned))}); if the "
                                 f"owner rotated to a new key, add its public key as "
                                 f"{Path(trusted_keys) / owner}/<any name>.pub", code="untrusted_key")
        return signing.load_public_key(pinned[key_id])
    try:
        return client.registered_key(owner, rec.signature.get("key_id"))
    except RegistryError as e:
        raise _refusal(e, "fetching the owner's keys", who, explain) from None
    except SignatureError as e:
        raise SignatureError(f"{who}: bad signature: {e}", code=e.code) from None


def verify_version(client: RegistryClient, record: VersionRecord, *, public_key: Ed25519PublicKey | None = None,
                   trusted_keys: str | os.PathLike[str] | None = None, explain: Explain | None = None) -> VerifiedVersion:
    """Step 2: the signed statement of ``record`` against the owner's key (pinned, or the registry's)."""
    pub = _owner_key(client, record, public_key, Path(trusted_keys) if trusted_keys else None, explain)
    ref = record.ref
    try:
        statement = signing.verify_statement(record.signature, pub, owner=ref.owner, adapter=ref.name,
                                             version=record.version)
    except SignatureError as e:
        raise SignatureError(f"{record.label}: bad signature: {e}", code=e.code) from None
    return VerifiedVersion(record, statement)


def reuse_verdict(record: VersionRecord, statement: dict[str, Any], adapters: frozenset[str] | None = None,
                  *, now: datetime | None = None) -> VerifiedVersion:
    """Step 2 for a signature document this process already verified, byte for byte (same digest)
    with the same trusted key: ``statement`` is what that verification returned. The claims that
    depend on the request and the clock are checked again, with the messages of
    ``signing.verify_statement``: expiry against ``now``, owner, adapter name (``adapters``: the
    statement's names as a set, O(1)) and version. The Ed25519 check is not repeated: the bytes
    it covered are the same."""
    ref = record.ref
    now = now or datetime.now(timezone.utc)
    problem, code = None, None
    expires = datetime.strptime(statement["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    if now >= expires:
        problem, code = (f"statement expired at {statement['expires_at']} (now {signing.format_timestamp(now)}); "
                         "re-sign the bundle with a later --expires"), "expired"
    elif statement["owner"] != ref.owner:
        problem, code = (f"owner mismatch: the statement is signed for owner {statement['owner']!r}, not "
                         f"{ref.owner!r}"), "owner_mismatch"
    elif ref.name not in (adapters if adapters is not None else statement["adapters"]):
        problem, code = (f"adapter name mismatch: the statement covers adapters {statement['adapters']}, not "
                         f"{ref.name!r}"), "name_mismatch"
    elif statement["version"] != record.version:
        problem, code = (f"version mismatch: the statement is signed for version {statement['version']}, not "
                         f"{record.version}"), "version_mismatch"
    if problem is not None:
        raise SignatureError(f"{record.label}: bad signature: {problem}", code=code)
    return VerifiedVersion(record, statement)


def fetch_verified(client: RegistryClient, target: AdapterRef | str | VersionRecord | VerifiedVersion,
                   files: Sequence[str], dest: str | os.PathLike[str], *, public_key: Ed25519PublicKey | None = None,
                   trusted_keys: str | os.PathLike[str] | None = None, reuse: Reuse | None = None,
                   adapter: str | None = None, subject: str = "adapter",
                   explain: Explain | None = None,
                   checked: MutableMapping[tuple[str, str], Manifest] | None = None,
                   accept: Callable[[Manifest], None] | None = None) -> Fetched:
    """Resolve, verify and download manifest.json plus ``files`` (bundle paths) into ``dest``.

    ``dest`` is a staging dir the caller owns (created if absent; on an error it may hold partial
    files, so the caller discards it). ``reuse(sha256, size)`` may return a local file the caller
    already verified to hold exactly those bytes: it is hard-linked (or copied) instead of
    downloaded. The manifest must list every file of ``files`` with its signed digest and size,
    the signed base model and (given) ``adapter``. ``subject`` starts every error message
    (``"<subject> owner/name@version: ..."``).

    ``checked`` (kept by the caller): manifests already checked, by (manifest.json sha256, signed
    statement's digest). ``check_manifest``'s verdict depends only on those two (the statement's
    adapters equal the manifest's, and the statement covers ``adapter`` and ``files``: checked
    before any byte is written), so on a hit manifest.json is neither fetched nor parsed again and
    ``Fetched.typed`` is the checked manifest (``Fetched.manifest`` stays empty).

    manifest.json comes down and is checked first; ``accept(manifest)`` (the host's own limits)
    then runs before any other file is fetched, and raises to refuse.
    """
    if isinstance(target, VerifiedVersion):
        verified = target
    else:
        record = target if isinstance(target, VersionRecord) else \
            resolve_version(client, target, subject=subject, explain=explain)
        verified = verify_version(client, record, public_key=public_key, trusted_keys=trusted_keys, explain=explain)
    label = verified.label
    needed = [MANIFEST, *(rel for rel in files if rel != MANIFEST)]
    entries = verified.entries(needed)  # before any byte is written
    if adapter is not None and adapter not in verified.statement["adapters"]:
        raise VerificationError(f"{label}: the signed statement does not cover adapter {adapter!r}")
    key, typed = None, None
    if checked is not None:
        statement_digest = verified.record.signature_sha256 or \
            hashlib.sha256(signing.canonical_json(verified.statement)).hexdigest()
        key = (entries[0]["sha256"], statement_digest)
        typed = checked.get(key)
    if typed is not None:
        needed, entries = needed[1:], entries[1:]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    result = Fetched(verified, dest, manifest={})
    placed: dict[str, Path] = {}  # sha256 -> a file of this call already under dest

    def place(rel: str, entry: dict[str, Any]) -> None:
        sha256, size, out = entry["sha256"], int(entry["size"]), dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        local = placed.get(sha256) or (reuse(sha256, size) if reuse is not None else None)
        if local is not None:
            link_or_copy(local, out)
            if sha256 not in placed:
                result.reused.append(rel)
        else:
            try:
                client.download_blob(sha256, size, out)
            except BlobDigestError as e:
                raise VerificationError(f"{label}: digest mismatch: the registry served {rel} as {e.served}, the "
                                        f"signed statement says {size} bytes with sha256 {sha256}; refusing it") from None
            except RegistryError as e:
                raise _refusal(e, f"downloading {rel}", label, explain) from None
            result.downloaded.append(rel)
            result.bytes_downloaded += size
            result.fresh[sha256] = out
        placed.setdefault(sha256, out)

    if typed is None:  # manifest.json first: checked before any tensor comes down
        place(needed[0], entries[0])
        try:
            result.manifest = json.loads((dest / MANIFEST).read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"{label}: manifest.json is not valid JSON ({e})") from None
        typed = signing.check_manifest(result.manifest, verified.statement, label, needed[1:], adapter=adapter)
        if checked is not None and key is not None:
            checked[key] = typed
        needed, entries = needed[1:], entries[1:]
    if accept is not None:
        accept(typed)
    for rel, entry in zip(needed, entries):
        place(rel, entry)
    result.typed = typed
    return result


def fetch_published_basis(client: RegistryClient, ref: AdapterRef | str, dest: str | Path, *,
                          public_key: Ed25519PublicKey | None = None,
                          known_keys: KnownKeys | None = None) -> tuple[Bundle, dict[str, Any]]:
    """The manifest and basis of published ``ref``, verified, into the new dir ``dest`` (atomic).

    The owner's key: ``public_key`` (pinned) when given; else, with ``known_keys``, trust on first
    use (:func:`soppu_client.known_keys.choose_key`: a key this user accepted before for the owner,
    or one the registry's rotation proofs lead to from it; the first key seen is accepted and
    recorded once the fetch succeeded); else the registry's key. Only these two files come down:
    other adapters' cores never leave the registry. Returns (the basis-only bundle, opened with
    ``verify_digests=False`` since its cores are absent; the verified signed statement).
    """
    subject = "published adapter"
    new: dict[str, str] = {}
    target: AdapterRef | str | VersionRecord = ref
    if public_key is None and known_keys is not None:
        record = resolve_version(client, ref, subject=subject)
        owner = record.ref.owner
        try:
            listing = client.get_keys(owner)
        except RegistryError as e:
            raise _refusal(e, "fetching the owner's keys", f"{subject} {record.ref}", None) from None
        try:
            public_key, new = choose_key(known_keys.load(owner), listing, owner, record.signature.get("key_id"),
                                         store=known_keys.path(owner))
        except SignatureError as e:
            raise SignatureError(f"{record.label}: bad signature: {e}", code=e.code) from None
        target = record
    with staged_dir(dest, force=False) as tmp:
        fetched = fetch_verified(client, target, [BASIS], tmp, public_key=public_key, subject=subject)
        opened = Bundle.open(tmp, verify_digests=False)  # the manifest's own checks
    if new and known_keys is not None:
        known_keys.add(fetched.verified.record.ref.owner, new)
    return Bundle(path=Path(dest), manifest=opened.manifest), fetched.statement
