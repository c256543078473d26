"""Ed25519 keys, signed bundle statements, and their verification.

A bundle is signed by writing ``<bundle>/signature.json``::

    {"statement": {...}, "signature": base64(Ed25519(canonical_json(statement))),
     "key_id": "ed25519:<32 hex>", "public_key": base64(raw 32 bytes)}

The statement (format ``soppu-statement/1``) names the owner, the sorted adapter names, an integer
version, the base model, an RFC 3339 UTC expiry and every file (``manifest.json`` plus each file
in the manifest's ``files``) with its sha256 and size.  Only the canonical JSON form of the
statement is signed, so re-formatting or re-ordering keys in signature.json does not matter, but
changing any value does.  Verification trusts only the public key the caller passes, never the
one embedded in signature.json (that one is only used to name a wrong key).

Failures raise :class:`~soppu_client.format.errors.SignatureError` (exit 1) naming what failed; bad
user input (unreadable key, bad option) raises :class:`~soppu_client.format.errors.InputError` and a
malformed bundle :class:`~soppu_client.format.errors.BundleError` (exit 2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from soppu_client.format.bundle import Manifest, is_safe_relpath
from soppu_client.format.errors import BundleError, InputError, SignatureError
from soppu_client.format.fsutil import atomic_write, file_digest
from soppu_client.format.names import (
    ADAPTER_NAME_RE,
    HEX64_RE,
    MANIFEST,
    OWNER_RE,
    PASSPHRASE_ENV,
    SIGNATURE,
    STATEMENT_FORMAT,
)

__all__ = [
    "generate_keypair", "load_private_key", "load_public_key", "public_key_id",
    "canonical_json", "parse_expiry", "format_timestamp", "build_statement", "sign_statement",
    "sign_bundle", "verify_statement", "verify_bundle", "read_signature", "diff_files", "check_manifest",
    "b64decode_canonical",
]

_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")  # fullmatch, ASCII digits
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdwy]?)\s*")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_STATEMENT_KEYS = frozenset({"format", "owner", "adapters", "version", "base_model", "expires_at", "files"})
_DOC_KEYS = frozenset({"statement", "signature", "key_id", "public_key"})


# --------------------------------------------------------------------------- files


# --------------------------------------------------------------------------- keys


def generate_keypair(private_path: Path, passphrase: bytes | None = None, *,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Create an Ed25519 key pair: PKCS#8 PEM private key at ``private_path`` (mode 0600,
    encrypted when ``passphrase`` is given) and SubjectPublicKeyInfo PEM at ``<private_path>.pub``.

    Refuses to replace existing files unless ``overwrite``; writes are atomic and a failure
    leaves neither file behind.  Returns (private path, public path).
    """
    priv_path = Path(private_path)
    pub_path = Path(str(priv_path) + ".pub")
    if not priv_path.parent.is_dir():
        raise InputError(f"cannot write key {priv_path}: directory {priv_path.parent} does not exist")
    if not overwrite:
        for p in (priv_path, pub_path):
            if p.exists():
                raise InputError(f"key file {p} already exists; choose another path or pass --force")
    if passphrase is not None and not passphrase:
        raise InputError("the key passphrase is empty; give a non-empty passphrase or none")
    key = Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        atomic_write(priv_path, priv_pem, mode=0o600)
        try:
            atomic_write(pub_path, pub_pem, mode=0o644)
        except BaseException:
            priv_path.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise InputError(f"cannot write key {priv_path}: {exc.strerror or exc}") from None
    return priv_path, pub_path


def load_private_key(path: Path | str, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load a PEM (PKCS#8 or OpenSSH) Ed25519 private key; InputError names the file and fix."""
    path = Path(path)
    data = _read_key_file(path, "private")
    ssh = data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
    loader = serialization.load_ssh_private_key if ssh else serialization.load_pem_private_key
    try:
        try:
            key = loader(data, None)
        except TypeError:  # password-protected
            if not passphrase:
                raise InputError(f"private key {path} is encrypted; give its passphrase with --passphrase-"
                                 f"file or the {PASSPHRASE_ENV} environment variable") from None
            try:
                key = loader(data, passphrase)
            except ValueError:
                raise InputError(f"cannot decrypt private key {path}: wrong passphrase") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InputError(f"{path} is not a usable private key (PEM PKCS#8 or OpenSSH); create one "
                         "with `soppu keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"private key {path} is {type(key).__name__}, not Ed25519; "
                         "create one with `soppu keygen`")
    return key


def _read_key_file(path: Path, kind: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{kind} key file {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{kind} key {path} is a directory, not a key file") from None
    except OSError as exc:
        raise InputError(f"cannot read {kind} key {path}: {exc.strerror or exc}") from None


def load_public_key(path_or_bytes: Ed25519PublicKey | Path | str | bytes) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a key object, a PEM/OpenSSH file path, PEM text, raw 32
    bytes, or base64 of the raw 32 bytes (str or bytes).  InputError says what was wrong."""
    if isinstance(path_or_bytes, Ed25519PublicKey):
        return path_or_bytes
    if isinstance(path_or_bytes, Path):
        return _public_from_bytes(_read_key_file(path_or_bytes, "public"), str(path_or_bytes))
    if isinstance(path_or_bytes, str):
        text = path_or_bytes.strip()
        if text.startswith(("-----BEGIN", "ssh-ed25519 ")):
            return _public_from_bytes(text.encode(), "public key text")
        if os.path.exists(path_or_bytes):
            return load_public_key(Path(path_or_bytes))
        raw = _b64_raw_key(text)
        if raw is None:
            raise InputError(f"public key {path_or_bytes!r} is neither an existing file nor a "
                             "base64 Ed25519 key (44 characters)")
        return Ed25519PublicKey.from_public_bytes(raw)
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return _public_from_bytes(bytes(path_or_bytes), "public key bytes")
    raise InputError(f"cannot use a {type(path_or_bytes).__name__} as a public key")


def b64decode_canonical(text: object, n_bytes: int | None = None) -> bytes | None:
    """The bytes of ``text`` if it is the one canonical standard base64 encoding of them (and
    they are ``n_bytes`` long, when given), else None.

    Canonical: alphabet ``A-Z a-z 0-9 + /``, ``=`` padding present, no whitespace, and the unused
    low bits of the last character zero, i.e. ``b64encode(b64decode(text)) == text``. A lenient
    decoder maps several strings to the same bytes (flip bit 1, 2 or 3 of the last character before
    ``==`` of a 64-byte signature: same signature), so a signature document would have more than
    one valid spelling. Every signature and key SOPPU decodes goes through here."""
    if not isinstance(text, str) or not text.isascii():
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw if n_bytes is None or len(raw) == n_bytes else None


def _b64_raw_key(text: str) -> bytes | None:
    return b64decode_canonical(text, 32)


def _public_from_bytes(data: bytes, label: str) -> Ed25519PublicKey:
    if len(data) == 32 and not data.lstrip().startswith(b"-----"):
        return Ed25519PublicKey.from_public_bytes(data)
    stripped = data.strip()
    key: object
    try:
        if stripped.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(stripped)
        elif stripped.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(stripped)
        else:
            raw = _b64_raw_key(stripped.decode("ascii", "replace"))
            if raw is None:
                raise ValueError("not base64 of 32 bytes")
            key = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise InputError(f"{label} is not an Ed25519 public key (expected PEM, OpenSSH, or base64 "
                         "of 32 raw bytes); use the .pub file written by `soppu keygen`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{label} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def _raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_id(pub: Ed25519PublicKey | Ed25519PrivateKey | Path | str | bytes) -> str:
    """Return ``"ed25519:" + sha256(raw 32-byte public key).hex()[:32]``."""
    if isinstance(pub, Ed25519PrivateKey):
        pub = pub.public_key()
    return "ed25519:" + hashlib.sha256(_raw_public(load_public_key(pub))).hexdigest()[:32]


# --------------------------------------------------------------------------- statements


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8 (not ASCII-escaped), no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def format_timestamp(when: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with seconds: ``2027-02-21T00:00:00Z``."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise InputError(f"expiry {when.isoformat()} has no time zone; give a UTC time such as "
                         "2027-02-21T00:00:00Z")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_timestamp(text: object) -> datetime | None:
    """An RFC 3339 UTC time like 2027-02-21T00:00:00Z, or None when ``text`` is not one."""
    if not isinstance(text, str) or not _TIMESTAMP.fullmatch(text):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:  # e.g. month 13
        return None


def parse_duration(text: str) -> timedelta | None:
    """``90`` / ``90s`` / ``30m`` / ``1.5h`` / ``7d`` / ``2w`` / ``1y`` -> a timedelta; None if ``text``
    is not a duration (the one duration syntax of every SOPPU option)."""
    m = _DURATION.fullmatch(text)
    return timedelta(seconds=float(m.group(1)) * _DURATION_UNITS[m.group(2)]) if m else None


def parse_expiry(value: str | datetime | timedelta, *, now: datetime | None = None) -> datetime:
    """Turn ``90d`` / ``12h`` / ``2w`` / ``1y`` (from ``now``), a date ``2027-02-21``, an RFC 3339
    time, a timedelta or an aware datetime into an aware UTC datetime in the future."""
    now = now or datetime.now(timezone.utc)
    if isinstance(value, timedelta):
        when = now + value
    elif isinstance(value, datetime):
        when = value
    else:
        text = value.strip()
        span = parse_duration(text)
        if span is not None:
            when = now + span
        else:
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                raise InputError(f"--expires {value!r} is not a duration (90d, 12h, 2w, 1y) or a "
                                 "date (2027-02-21 or 2027-02-21T00:00:00Z)") from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
    if when.tzinfo is None:
        raise InputError(f"expiry {when.isoformat()} has no time zone; use an aware datetime")
    if when <= now:
        raise InputError(f"expiry {format_timestamp(when)} is not in the future; give a later "
                         "--expires")
    return when.astimezone(timezone.utc)


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name):
        raise InputError(f"{kind} name {name!r} is invalid; use 1-128 characters from "
                         "A-Z a-z 0-9 . _ - starting with a letter or digit")
    return name


def _check_version(version: object) -> int:
    if type(version) is not int or version < 1:
        raise InputError(f"version {version!r} is invalid; give a positive integer (versions only grow)")
    return version


def _safe_relpath(bundle_dir: Path, rel: object) -> Path:
    """Resolve a manifest file path; refuse absolute paths, '..', backslashes and symlinks."""
    if not is_safe_relpath(rel):
        raise BundleError(f"{bundle_dir / MANIFEST}: file path {rel!r} is not a plain relative "
                          "path inside the bundle")
    return bundle_dir / rel


def _load_manifest(bundle_dir: Path) -> dict:
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise InputError(f"bundle {bundle_dir} is not a directory")
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle_dir} has no {MANIFEST}; is it a soppu bundle?") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object")
    for field, kind in (("base_model", str), ("adapters", dict), ("files", dict)):
        if not isinstance(manifest.get(field), kind):
            raise BundleError(f"{path}: field `{field}` is missing or not a {kind.__name__}")
    return manifest


def build_statement(bundle_dir: Path, owner: str, version: int,
                    expires_at: datetime | str | timedelta) -> dict:
    """Build the statement for a bundle from its manifest and the files on disk.

    Checks the owner and adapter names, that ``version`` is a positive int, that each file the
    manifest lists exists with the digest and size the manifest records, and that the bundle
    holds no unlisted files (BundleError lists every problem at once).
    """
    bundle_dir = Path(bundle_dir)
    _check_name("owner", owner)
    _check_version(version)
    expires = format_timestamp(parse_expiry(expires_at))
    manifest = _load_manifest(bundle_dir)
    adapters = sorted(manifest["adapters"])
    for name in adapters:
        _check_name("adapter", name)
    if not adapters:
        raise BundleError(f"{bundle_dir / MANIFEST}: `adapters` is empty; nothing to sign")
    files: list[dict] = []
    problems = [f"`{rel}` must not be listed in manifest `files`"
                for rel in (MANIFEST, SIGNATURE) if rel in manifest["files"]]
    listed = {**manifest["files"], MANIFEST: None}
    listed.pop(SIGNATURE, None)
    for rel in sorted(listed):
        digest, size, problem = _describe_listed(bundle_dir, rel, listed[rel])
        if problem:
            problems.append(problem)
        else:
            files.append({"path": rel, "sha256": digest, "size": size})
    problems += [f"file `{p}` is in the bundle but not in manifest `files`; remove it"
                 for p in sorted(set(_walk_bundle(bundle_dir)) - set(listed))]
    if problems:
        raise BundleError(f"cannot sign bundle {bundle_dir}:\n" + "\n".join(f"  - {p}" for p in problems))
    return {"format": STATEMENT_FORMAT, "owner": owner, "adapters": adapters, "version": version,
            "base_model": manifest["base_model"], "expires_at": expires, "files": files}


def _describe_listed(bundle_dir: Path, rel: str, recorded: object) -> tuple[str, int, str | None]:
    """Hash one listed file; return (sha256, size, problem or None)."""
    path = _safe_relpath(bundle_dir, rel)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        return "", 0, f"`{rel}` is not a regular file"
    if not path.exists():
        return "", 0, f"`{rel}` is listed in the manifest but missing"
    digest, size = file_digest(path)
    if recorded is not None:
        if not isinstance(recorded, dict):
            return "", 0, f"manifest entry for `{rel}` is not an object"
        if recorded.get("sha256") != digest or recorded.get("size") != size:
            return "", 0, (f"`{rel}` has sha256 {digest} and size {size} but the manifest records "
                           f"{recorded.get('sha256')} and {recorded.get('size')}; rebuild the bundle")
    return digest, size, None


def _walk_bundle(bundle_dir: Path) -> list[str]:
    """Every file under the bundle (POSIX relative paths) except signature.json."""
    out = []
    for root, dirs, names in os.walk(bundle_dir):
        dirs.sort()
        for n in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, n).relative_to(bundle_dir).as_posix()
            if rel != SIGNATURE:
                out.append(rel)
    return sorted(out)


def sign_statement(statement: dict, private_key: Ed25519PrivateKey) -> dict:
    """Return the signature document (statement, base64 signature, key_id, base64 public key)."""
    pub = private_key.public_key()
    sig = private_key.sign(canonical_json(statement))
    return {"statement": statement, "signature": base64.b64encode(sig).decode("ascii"),
            "key_id": public_key_id(pub), "public_key": base64.b64encode(_raw_public(pub)).decode("ascii")}


def sign_bundle(bundle_dir: Path, private_key: Ed25519PrivateKey, owner: str, version: int,
                expires_at: datetime | str | timedelta) -> Path:
    """Build, sign and atomically write ``<bundle>/signature.json``; return its path."""
    bundle_dir = Path(bundle_dir)
    doc = sign_statement(build_statement(bundle_dir, owner, version, expires_at), private_key)
    out = bundle_dir / SIGNATURE
    data = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
    try:
        atomic_write(out, data, mode=0o644)
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


# --------------------------------------------------------------------------- verification


def read_signature(bundle_dir: Path) -> dict:
    """Read ``<bundle>/signature.json``; SignatureError if absent or not a JSON object."""
    path = Path(bundle_dir) / SIGNATURE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SignatureError(f"bundle {bundle_dir} is not signed: {SIGNATURE} is missing; "
                             "sign it with `soppu sign`", code="unsigned") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise SignatureError(f"{path} is not readable JSON: {exc}", code="malformed") from None
    if not isinstance(doc, dict):
        raise SignatureError(f"{path}: expected a JSON object", code="malformed")
    return doc


def _check_signature(doc: dict, pub: Ed25519PublicKey) -> dict:
    if set(doc) != _DOC_KEYS:
        raise SignatureError(f"signature document is malformed: keys {sorted(doc)} != {sorted(_DOC_KEYS)}",
                             code="malformed")
    statement, sig_b64 = doc["statement"], doc["signature"]
    if not isinstance(statement, dict) or not isinstance(sig_b64, str):
        raise SignatureError("signature document is malformed: needs a `statement` object and a "
                             "base64 `signature` string", code="malformed")
    expected_id = public_key_id(pub)
    raw = _b64_raw_key(doc["public_key"]) if isinstance(doc["public_key"], str) else None
    if raw is None:
        raise SignatureError("signature document is malformed: `public_key` is not canonical base64 of 32 bytes "
                             "(padded, no whitespace, unused bits zero)", code="malformed")
    claimed_id = public_key_id(Ed25519PublicKey.from_public_bytes(raw))
    if doc["key_id"] != claimed_id:
        raise SignatureError(f"signature document is malformed: `key_id` {doc['key_id']!r} does not "
                             f"match its `public_key` ({claimed_id})", code="malformed")
    if claimed_id != expected_id:
        raise SignatureError(f"wrong key: the bundle was signed with key {claimed_id}, but the "
                             f"trusted public key is {expected_id}", code="wrong_key")
    sig = b64decode_canonical(sig_b64, 64)
    if sig is None:
        raise SignatureError("signature document is malformed: `signature` is not canonical base64 of 64 bytes "
                             "(padded, no whitespace, unused bits zero); sign the bundle again with `soppu sign`",
                             code="malformed")
    try:
        message = canonical_json(statement)
    except (ValueError, TypeError):
        raise SignatureError("signature document is malformed: the statement is not canonical-JSON serialisable",
                             code="malformed") from None
    try:
        pub.verify(sig, message)
    except InvalidSignature:
        raise SignatureError(f"signature does not verify with key {expected_id}: the statement was "
                             "changed after signing, or it was signed with another key",
                             code="bad_signature") from None
    return statement


def _check_statement_schema(st: dict) -> None:
    problems = []
    if set(st) != _STATEMENT_KEYS:
        problems.append(f"keys {sorted(st)} != {sorted(_STATEMENT_KEYS)}")
    if st.get("format") != STATEMENT_FORMAT:
        problems.append(f"format {st.get('format')!r} is not {STATEMENT_FORMAT!r}")
    if not isinstance(st.get("owner"), str) or not isinstance(st.get("base_model"), str):
        problems.append("owner and base_model must be strings")
    elif not OWNER_RE.match(st["owner"]):
        problems.append(f"owner {st['owner']!r} must match {OWNER_RE.pattern}")
    ads = st.get("adapters")
    if not (isinstance(ads, list) and ads and all(isinstance(a, str) for a in ads)
            and ads == sorted(set(ads))):
        problems.append("adapters must be a non-empty sorted list of distinct names")
    elif not all(ADAPTER_NAME_RE.match(a) for a in ads):
        problems.append(f"adapter names {[a for a in ads if not ADAPTER_NAME_RE.match(a)]!r} must match "
                        f"{ADAPTER_NAME_RE.pattern}")
    if type(st.get("version")) is not int:
        problems.append("version must be an integer")
    if _parse_timestamp(st.get("expires_at")) is None:
        problems.append("expires_at must be an RFC 3339 UTC time like 2027-02-21T00:00:00Z")
    files = st.get("files")
    if not (isinstance(files, list) and all(_valid_file_entry(f) for f in files)):
        problems.append("files must be a list of {path, sha256 (64 hex), size (int)}")
    elif [f["path"] for f in files] != sorted({f["path"] for f in files}):
        problems.append("files must be sorted by path without duplicates")
    elif not all(is_safe_relpath(f["path"]) for f in files):
        problems.append("file paths must be plain relative paths inside the bundle")
    elif MANIFEST not in {f["path"] for f in files}:
        problems.append(f"files must include {MANIFEST}")
    if problems:
        raise SignatureError("signed statement is malformed: " + "; ".join(problems), code="bad_statement")


def _valid_file_entry(f: object) -> bool:
    return (isinstance(f, dict) and set(f) == {"path", "sha256", "size"} and isinstance(f["path"], str)
            and isinstance(f["sha256"], str) and bool(HEX64_RE.match(f["sha256"]))
            and type(f["size"]) is int and f["size"] >= 0)


def verify_statement(signature_doc: dict, public_key: Ed25519PublicKey | Path | str | bytes, *,
                     now: datetime | None = None, owner: str | None = None,
                     adapter: str | Sequence[str] | None = None,
                     version: int | None = None) -> dict:
    """Verify a signature document against the trusted ``public_key``; return the statement.

    Checks, in order: the signer's key is the trusted one, the Ed25519 signature over the
    canonical statement, the statement schema, expiry against ``now`` (default: current UTC
    time), and that ``owner`` / ``adapter`` (one name or several) / ``version``, when given,
    match the statement.  Raises SignatureError naming the first thing that failed.
    """
    if not isinstance(signature_doc, dict):
        raise SignatureError("signature document is malformed: expected a JSON object", code="malformed")
    pub = load_public_key(public_key)
    st = _check_signature(signature_doc, pub)
    _check_statement_schema(st)
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    expires = _parse_timestamp(st["expires_at"])
    if expires is None or now >= expires:  # (None: ruled out by the schema check)
        raise SignatureError(f"statement expired at {st['expires_at']} (now {format_timestamp(now)}); "
                             "re-sign the bundle with a later --expires", code="expired")
    if owner is not None and st["owner"] != owner:
        raise SignatureError(f"owner mismatch: the statement is signed for owner {st['owner']!r}, "
                             f"not {owner!r}", code="owner_mismatch")
    wanted = [adapter] if isinstance(adapter, str) else list(adapter or [])
    missing = [a for a in wanted if a not in st["adapters"]]
    if missing:
        names = repr(missing[0]) if len(missing) == 1 else repr(missing)
        raise SignatureError(f"adapter name mismatch: the statement covers adapters "
                             f"{st['adapters']}, not {names}", code="name_mismatch")
    if version is not None and st["version"] != version:
        raise SignatureError(f"version mismatch: the statement is signed for version {st['version']}, "
                             f"not {version}", code="version_mismatch")
    return st


def diff_files(expected: Iterable[dict], actual: dict[str, tuple[str, int]]) -> list[str]:
    """Compare statement file entries with ``{path: (sha256, size)}`` actually present.

    Returns one message per problem (changed, missing, extra, renamed), empty if all match.
    Digests are compared in constant time.
    """
    want = {f["path"]: (f["sha256"], f["size"]) for f in expected}
    problems = []
    missing = [p for p in sorted(want) if p not in actual]
    extra = [p for p in sorted(actual) if p not in want]
    for p in sorted(set(want) & set(actual)):
        (w_sha, w_size), (a_sha, a_size) = want[p], actual[p]
        if not hmac.compare_digest(w_sha.encode(), a_sha.encode()) or w_size != a_size:
            problems.append(f"file `{p}` was modified: expected sha256 {w_sha} ({w_size} bytes), "
                            f"actual sha256 {a_sha} ({a_size} bytes)")
    for p in missing:
        renamed_to = next((e for e in extra if actual[e][1] == want[p][1]
                           and hmac.compare_digest(actual[e][0].encode(), want[p][0].encode())), None)
        if renamed_to is not None:
            extra.remove(renamed_to)
            problems.append(f"file `{p}` was renamed to `{renamed_to}`")
        else:
            problems.append(f"file `{p}` is missing (expected sha256 {want[p][0]})")
    problems += [f"extra file `{p}` is not covered by the signature" for p in extra]
    return problems


def _files_on_disk(bundle_dir: Path) -> tuple[dict[str, tuple[str, int]], list[str]]:
    actual, problems = {}, []
    for rel in _walk_bundle(bundle_dir):
        path = bundle_dir / rel
        if path.is_symlink() or not path.is_file():
            problems.append(f"`{rel}` is not a regular file (symlinks are refused)")
            continue
        actual[rel] = file_digest(path)
    return actual, problems


def verify_bundle(bundle_dir: Path, public_key: Ed25519PublicKey | Path | str | bytes, *,
                  now: datetime | None = None, owner: str | None = None,
                  adapter: str | Sequence[str] | None = None,
                  version: int | None = None) -> dict:
    """Verify ``<bundle>/signature.json`` and every file on disk; return the statement.

    Runs :func:`verify_statement`, then hashes every file in the bundle and reports, in one
    SignatureError, each modified (expected vs actual digest), missing, renamed or extra file,
    and any disagreement between manifest.json and the statement (adapters, base model).
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise InputError(f"bundle {bundle_dir} is not a directory")
    st = verify_statement(read_signature(bundle_dir), public_key, now=now, owner=owner,
                          adapter=adapter, version=version)
    actual, problems = _files_on_disk(bundle_dir)
    problems = diff_files(st["files"], actual) + problems
    if problems:
        raise SignatureError(f"bundle {bundle_dir} does not match its signed statement:\n"
                             + "\n".join(f"  - {p}" for p in problems), code="files_mismatch")
    try:
        data: Any = json.loads((bundle_dir / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:
        data = exc
    _, problems = _manifest_problems(data, st)
    if problems:
        raise SignatureError(f"bundle {bundle_dir} does not match its signed statement:\n"
                             + "\n".join(f"  - {p}" for p in problems), code="bad_manifest")
    return st


def _manifest_problems(data: Any, statement: dict[str, Any], needed: Sequence[str] = (),
                       adapter: str | None = None) -> tuple[Manifest | None, list[str]]:
    """The one rule set for manifest.json against its (verified) signed statement: the manifest
    parses (:meth:`Manifest.from_json`: format tag, names, core paths, shapes), has the statement's
    base model and adapters (and ``adapter``, when given), lists exactly the statement's files
    (manifest.json aside) with their signed sha256 and size, and the statement covers ``needed``."""
    if isinstance(data, Exception):
        return None, [f"{MANIFEST} is not readable JSON: {data}"]
    try:
        manifest = Manifest.from_json(data, MANIFEST)
    except BundleError as exc:
        return None, [str(exc)]
    signed = {f["path"]: f for f in statement["files"]}
    problems = []
    if manifest.base_model != statement["base_model"]:
        problems.append(f"manifest base_model {manifest.base_model!r} != statement {statement['base_model']!r}")
    if sorted(manifest.adapters) != statement["adapters"]:
        problems.append(f"manifest adapters {sorted(manifest.adapters)} != statement adapters {statement['adapters']}")
    if adapter is not None and adapter not in manifest.adapters:
        problems.append(f"manifest has no adapter {adapter!r}")
    listed, covered = {MANIFEST, *manifest.files}, set(signed)
    if listed != covered:
        problems.append(f"manifest files {sorted(listed)} != statement files {sorted(covered)}")
    for rel, entry in sorted(manifest.files.items()):
        f = signed.get(rel)
        if f is not None and (entry.sha256 != f["sha256"] or entry.size != f["size"]):
            problems.append(f"`{rel}`: manifest records sha256 {entry.sha256} ({entry.size} bytes), the statement "
                            f"signs {f['sha256']} ({f['size']} bytes)")
    problems += [f"`{rel}` is not in the signed statement" for rel in needed if rel not in signed]
    return manifest, problems


def check_manifest(manifest: Any, statement: dict[str, Any], label: str, needed: Sequence[str] = (),
                   adapter: str | None = None) -> Manifest:
    """Check a manifest.json object (``manifest``, as parsed from JSON) against its verified signed
    ``statement``; return it typed. Rules: see :func:`_manifest_problems` (the same ones
    :func:`verify_bundle` applies). One SignatureError (code ``bad_manifest``), prefixed with
    ``label``, names every problem."""
    parsed, problems = _manifest_problems(manifest, statement, needed, adapter)
    if problems or parsed is None:
        raise SignatureError(f"{label}: manifest does not match its signature: " + "; ".join(problems),
                             code="bad_manifest")
    return parsed
