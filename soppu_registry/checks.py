"""Checks a publish request must pass before a version becomes visible.

Order: request shape -> key (registered, this owner's, active) -> ``signing.verify_statement``
(signature, statement schema incl. safe file paths, expiry, owner/name/version vs the URL) ->
every listed blob stored, owned by the publisher, with its size -> ``signing.check_manifest``
(the manifest.json blob against the statement; it lists only files the format defines) ->
metrics.json bounded and of the bundle's own modules and adapters -> the rank cap -> every safetensors blob
(header bounded by the tensors the manifest implies) passes
``validate_safetensors`` with the tensors ``Manifest.expected_tensors`` names, and its quantization
scales (if any) are finite and > 0 (``bundle.check_scales``). The rules live in ``soppu_client.format``; this module only
maps their failures (``SignatureError.code``) onto the API's HTTP statuses and error codes.
"""

from __future__ import annotations

import threading
from typing import Any

from soppu_client.format import signing
from soppu_client.format.bundle import Manifest, check_scales, metrics_cap, metrics_problems, scale_tensor_names
from soppu_client.format.errors import BundleError, SafetensorsFormatError, SignatureError
from soppu_client.format.names import MANIFEST, METRICS
from soppu_client.format.safetensors_check import validate_safetensors

from soppu_registry.bodies import loads_bounded
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


def check_signature(store: Storage, doc: Any, owner: str, name: str | None, version: int) -> dict[str, Any]:
    """Key (registered, ``owner``'s, active), then ``signing.verify_statement`` against it with the
    URL's owner, name (None for a batch publish: every adapter of the statement) and version;
    returns the verified statement (its ``files`` sorted, safe,
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


def check_blobs(store: Storage, files: list[dict[str, Any]], owner: str) -> None:
    """Every listed blob is stored, owned by ``owner`` (uploaded by it, or the same bytes re-sent),
    and has the listed size (all problems in one error). A blob ``owner`` does not own is reported
    exactly as an absent one, without its size: the error describes only the caller's own blobs,
    and nothing another owner stored is read before this check passes."""
    problems = []
    sizes = store.owned_blob_sizes(owner, [f["sha256"] for f in files])  # set-based: one query per chunk
    for f in files:
        size = sizes[f["sha256"]]
        if size is None:
            problems.append(("missing_blob", f"{f['path']} (sha256:{f['sha256']}) was not uploaded"))
        elif size != f["size"]:
            problems.append(("size_mismatch", f"{f['path']} (sha256:{f['sha256']}) has {size} bytes, statement says {f['size']}"))
    if problems:
        raise _bad(problems[0][0], "; ".join(m for _, m in problems))


MAX_MANIFEST_BYTES = 16 << 20
"""Largest manifest.json a publish parses (a real one with metrics is well under 1 MiB per 100 adapters)."""
HEADER_BYTES_BASE = 64 << 10
"""Safetensors header bytes allowed besides the tensors' entries (``__metadata__``, padding)."""
HEADER_BYTES_PER_TENSOR = 256
"""Header bytes allowed per tensor the manifest implies, plus 6 per character of its name (JSON
escapes): ``{"dtype":"BF16","shape":[d,k],"data_offsets":[a,b]}`` with 19-digit numbers is ~110."""


def check_manifest(store: Storage, st: dict[str, Any], files: list[dict[str, Any]], name: str | None) -> Manifest:
    """The manifest.json blob agrees with the statement (``signing.check_manifest``); 400 ``bad_manifest``.
    Its size (MAX_MANIFEST_BYTES) and JSON depth are bounded before it is parsed."""
    entry = next(f for f in files if f["path"] == MANIFEST)  # verify_statement requires it
    if entry["size"] > MAX_MANIFEST_BYTES:
        raise _bad("bad_manifest", f"{MANIFEST} is {entry['size']} bytes, over the limit of {MAX_MANIFEST_BYTES}")
    data = loads_bounded(store.read_blob(entry["sha256"]), MANIFEST, code="bad_manifest")
    try:
        return signing.check_manifest(data, st, MANIFEST, adapter=name)
    except SignatureError as e:
        raise _bad("bad_manifest", str(e)) from None


def check_metrics(store: Storage, files: list[dict[str, Any]], m: Manifest) -> None:
    """metrics.json, when listed, is at most ``bundle.metrics_cap`` bytes and holds only the
    bundle's own metrics (``bundle.metrics_problems``); 400 ``bad_manifest``. With the rule that a
    manifest lists no file the format does not define (``Manifest.from_json``), no published byte
    is outside a structure the registry checked. (Run through ``SafetensorsChecker.check_metrics``,
    which remembers what passed.)"""
    entry = next((f for f in files if f["path"] == METRICS), None)
    if entry is None:
        return
    cap = metrics_cap(m)
    if entry["size"] > cap:
        raise _bad("bad_manifest", f"{METRICS} is {entry['size']} bytes, over the limit of {cap} bytes for "
                                   f"{len(m.modules)} module(s) x {len(m.adapters)} adapter(s)")
    problems = metrics_problems(loads_bounded(store.read_blob(entry["sha256"]), METRICS, code="bad_manifest"), m)
    if problems:
        raise _bad("bad_manifest", "; ".join(problems))


def check_rank(m: Manifest, max_rank: int, max_served_params: int | None = None) -> None:
    """The registry's own caps on the basis rank (``max_rank``, `--max-rank`) and on what one adapter
    of the bundle makes a host materialize (``Manifest.served_params``, `--max-served-params`; a
    tiny core on a shared basis still becomes k (d_out + d_in) parameters per module on every host
    that serves it); 400 ``bad_manifest``. The structural rules (k <= min(d_out, d_in), dtypes,
    clusters, core paths) are Manifest.from_json's."""
    if m.rank > max_rank:
        raise _bad("bad_manifest", f"{MANIFEST}: `rank` {m.rank} exceeds this registry's limit of {max_rank} "
                                   "(--max-rank); compress with a smaller --rank")
    served = m.served_params()
    if max_served_params is not None and served > max_served_params:
        raise _bad("bad_manifest", f"{MANIFEST}: each adapter would be served as {served} parameters "
                                   f"(sum of k x (d_out + d_in) over {len(m.modules)} module(s)), over this registry's "
                                   f"limit of {max_served_params} (--max-served-params); compress with a smaller "
                                   "--rank or fewer modules")


def header_cap(expected: dict[str, Any] | None) -> int:
    """Most safetensors header bytes a file may have, from the tensors the manifest implies for it
    (none: HEADER_BYTES_BASE), so a header stuffed with extra entries is refused before parsing."""
    return HEADER_BYTES_BASE + sum(HEADER_BYTES_PER_TENSOR + 6 * len(t) for t in expected or ())


class SafetensorsChecker:
    """validate_safetensors on blobs, and :func:`check_metrics`, remembering what passed:
    (digest, expectation) pairs, (metrics.json digest, manifest.json digest) pairs. A bundle
    published adapter by adapter is checked once."""

    def __init__(self) -> None:
        self._ok: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def check_metrics(self, store: Storage, files: list[dict[str, Any]], m: Manifest) -> None:
        digests = {f["path"]: f["sha256"] for f in files}
        if METRICS not in digests:
            return
        key = (digests[METRICS], "metrics of manifest " + digests[MANIFEST])
        with self._lock:
            if key in self._ok:
                return
        check_metrics(store, files, m)
        with self._lock:
            self._ok.add(key)

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
                validate_safetensors(store.blob_path(f["sha256"]), expected=exp, name=f["path"],
                                     max_header_bytes=header_cap(exp))
            except SafetensorsFormatError as e:
                raise _bad("bad_safetensors", str(e)) from None
            names = scale_tensor_names(m, f["path"])
            if names:
                from safetensors import safe_open

                with safe_open(str(store.blob_path(f["sha256"])), "np") as fh:
                    scales = {n: fh.get_tensor(n) for n in names}
                try:
                    check_scales(m, f["path"], scales, f"adapter version (blob sha256:{f['sha256']})")
                except BundleError as e:
                    raise _bad("bad_safetensors", str(e)) from None
            with self._lock:
                self._ok.add(key)
