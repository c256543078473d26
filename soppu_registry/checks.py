"""Checks a publish request must pass before a version becomes visible.

Order: request shape -> key (registered, this owner's, active) -> ``signing.verify_statement``
(signature, statement schema incl. safe file paths, expiry, owner/name/version vs the URL) ->
every listed blob stored with its size -> ``signing.check_manifest`` (the manifest.json blob
against the statement) -> every safetensors blob passes ``validate_safetensors`` with the tensors
``Manifest.expected_tensors`` names. The rules live in ``soppu_client.format``; this module only
maps their failures (``SignatureError.code``) onto the API's HTTP statuses and error codes.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from soppu_client.format import signing
from soppu_client.format.bundle import Manifest
from soppu_client.format.errors import SafetensorsFormatError, SignatureError
from soppu_client.format.names import MANIFEST
from soppu_client.format.safetensors_check import validate_safetensors

from soppu_registry.errors import ApiError
from soppu_registry.storage import Storage

# SignatureError.code -> HTTP status; every other code is refused as 403 ``bad_signature``
_STATUS = {"expired": 403, "owner_mismatch": 403, "name_mismatch": 403, "version_mismatch": 403,
           "bad_statement": 400, "bad_manifest": 400}


def _bad(code: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, code, message)


def _refusal(e: SignatureError, statement: Any, key_id: str) -> ApiError:
    code = e.code if e.code in _STATUS else "bad_signature"
    if code == "bad_signature":
        return _bad(code, f"signature does not verify with key {key_id}: {e}", 403)
    if code == "expired":  # the server's clock is no news to the client
        return _bad(code, f"statement expired at {statement.get('expires_at')}", 403)
    return _bad(code, str(e), _STATUS[code])


def check_signature(store: Storage, doc: Any, owner: str, name: str, version: int) -> dict[str, Any]:
    """Key (registered, ``owner``'s, active), then ``signing.verify_statement`` against it with the
    URL's owner, name and version; returns the verified statement (its ``files`` sorted, safe,
    including manifest.json). Failures are 403 (400 for a malformed request or statement)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("statement"), dict) or not isinstance(doc.get("key_id"), str):
        raise _bad("bad_request", "body must be {\"signature\": <signature.json>} with `statement` and `key_id`")
    key_id = doc["key_id"]
    key = store.key_owner(key_id)
    if key is None:
        raise _bad("unknown_key", f"key {key_id} is not registered with this registry", 403)
    if key[0] != owner:
        raise _bad("wrong_owner_key", f"key {key_id} belongs to owner {key[0]!r}, not {owner!r}", 403)
    if not key[1]:
        raise _bad("rotated_key", f"key {key_id} of owner {owner!r} was rotated out; sign with the current key", 403)
    pub_b64 = next(k["public_key"] for k in store.keys(owner) if k["key_id"] == key_id)
    try:
        return signing.verify_statement(doc, signing.load_public_key(pub_b64.encode()), owner=owner, adapter=name,
                                        version=version)
    except SignatureError as e:
        raise _refusal(e, doc["statement"], key_id) from None


def check_blobs(store: Storage, files: list[dict[str, Any]]) -> None:
    """Every listed blob is stored with the listed size (all problems in one error)."""
    problems = []
    for f in files:
        size = store.blob_size(f["sha256"])
        if size is None:
            problems.append(("missing_blob", f"{f['path']} (sha256:{f['sha256']}) was not uploaded"))
        elif size != f["size"]:
            problems.append(("size_mismatch", f"{f['path']} (sha256:{f['sha256']}) has {size} bytes, statement says {f['size']}"))
    if problems:
        raise _bad(problems[0][0], "; ".join(m for _, m in problems))


def check_manifest(store: Storage, st: dict[str, Any], files: list[dict[str, Any]], name: str) -> Manifest:
    """The manifest.json blob agrees with the statement (``signing.check_manifest``); 400 ``bad_manifest``."""
    entry = next(f for f in files if f["path"] == MANIFEST)  # verify_statement requires it
    try:
        data = json.loads(store.read_blob(entry["sha256"]))
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad("bad_manifest", f"{MANIFEST} is not valid JSON: {e}") from None
    try:
        return signing.check_manifest(data, st, MANIFEST, adapter=name)
    except SignatureError as e:
        raise _bad("bad_manifest", str(e)) from None


class SafetensorsChecker:
    """validate_safetensors on blobs, remembering (digest, expectation) pairs that passed."""

    def __init__(self) -> None:
        self._ok: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def check(self, store: Storage, files: list[dict[str, Any]], m: Manifest) -> None:
        for f in files:
            if not f["path"].endswith(".safetensors"):
                continue
            exp = m.expected_tensors(f["path"])
            key = (f["sha256"], repr(sorted(exp.items())) if exp else "")
            with self._lock:
                if key in self._ok:
                    continue
            try:
                validate_safetensors(store.blob_path(f["sha256"]), expected=exp, name=f["path"])
            except SafetensorsFormatError as e:
                raise _bad("bad_safetensors", str(e)) from None
            with self._lock:
                self._ok.add(key)
