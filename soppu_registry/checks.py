"""Checks a publish request must pass before a version becomes visible.

Order: request shape -> key (registered, this owner's, active) -> URL vs statement (owner, name,
version) -> expiry and signature (``soppu_client.format.signing.verify_statement``) -> every listed blob
stored with its size -> manifest.json blob parses and agrees with the statement -> every
safetensors blob passes ``validate_safetensors`` with the shapes the manifest implies.
Each failure is an ApiError whose code names the check.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from typing import Any

from soppu_client.format import signing
from soppu_client.format.errors import SafetensorsFormatError, SignatureError
from soppu_client.format.names import HEX64_RE
from soppu_client.format.safetensors_check import validate_safetensors

from soppu_registry.storage import ApiError, Storage

BUNDLE_FORMAT = "soppu-bundle/1"
STATEMENT_FORMAT = "soppu-statement/1"
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def _bad(code: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, code, message)


def parse_time(value: Any) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def check_files(statement: dict[str, Any]) -> list[dict[str, Any]]:
    """The statement's file list, normalised to [{path, sha256, size}]; 400 ``bad_statement``."""
    files = statement.get("files")
    if not isinstance(files, list) or not files:
        raise _bad("bad_statement", "signed statement has no `files` list")
    out, seen = [], set()
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) \
                or not isinstance(f.get("sha256"), str) or not HEX64_RE.match(f["sha256"]) \
                or not isinstance(f.get("size"), int) or f["size"] < 0:
            raise _bad("bad_statement", f"signed statement has a malformed file entry: {f!r}")
        p = f["path"]
        if p.startswith("/") or "\\" in p or any(s in ("", ".", "..") for s in p.split("/")):
            raise _bad("bad_statement", f"signed statement lists an unsafe path {p!r}")
        if p in seen:
            raise _bad("bad_statement", f"signed statement lists {p!r} twice")
        seen.add(p)
        out.append({"path": p, "sha256": f["sha256"], "size": f["size"]})
    return sorted(out, key=lambda f: f["path"])


def check_signature(store: Storage, doc: Any, owner: str, name: str, version: int) -> dict[str, Any]:
    """Key, URL match, expiry and signature; returns the statement. Failures are 403 (400 if malformed)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("statement"), dict) or not isinstance(doc.get("key_id"), str):
        raise _bad("bad_request", "body must be {\"signature\": <signature.json>} with `statement` and `key_id`")
    st, key_id = doc["statement"], doc["key_id"]
    key = store.key_owner(key_id)
    if key is None:
        raise _bad("unknown_key", f"key {key_id} is not registered with this registry", 403)
    if key[0] != owner:
        raise _bad("wrong_owner_key", f"key {key_id} belongs to owner {key[0]!r}, not {owner!r}", 403)
    if not key[1]:
        raise _bad("rotated_key", f"key {key_id} of owner {owner!r} was rotated out; sign with the current key", 403)
    if st.get("owner") != owner:
        raise _bad("owner_mismatch", f"statement is for owner {st.get('owner')!r}, URL names {owner!r}", 403)
    adapters = st.get("adapters")
    if not isinstance(adapters, list) or name not in adapters:
        raise _bad("name_mismatch", f"statement does not cover adapter {name!r} (it lists {adapters!r})", 403)
    if st.get("version") != version or isinstance(st.get("version"), bool):
        raise _bad("version_mismatch", f"statement is for version {st.get('version')!r}, URL names {version}", 403)
    exp = parse_time(st.get("expires_at"))
    if exp is None:
        raise _bad("bad_statement", f"statement `expires_at` {st.get('expires_at')!r} is not an RFC 3339 time")
    if exp <= datetime.now(timezone.utc):
        raise _bad("expired", f"statement expired at {st.get('expires_at')}", 403)
    pub_b64 = next(k["public_key"] for k in store.keys(owner) if k["key_id"] == key_id)
    try:
        signing.verify_statement(doc, signing.load_public_key(pub_b64.encode()), owner=owner, adapter=name, version=version)
    except SignatureError as e:
        raise _bad("bad_signature", f"signature does not verify with key {key_id}: {e}", 403) from None
    if st.get("format") != STATEMENT_FORMAT:
        raise _bad("bad_statement", f"statement format {st.get('format')!r} is not {STATEMENT_FORMAT!r}")
    return st


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


def check_manifest(store: Storage, st: dict[str, Any], files: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """manifest.json agrees with the statement: format, base model, adapters, files. 400 ``bad_manifest``."""
    by_path = {f["path"]: f for f in files}
    if "manifest.json" not in by_path:
        raise _bad("bad_manifest", "statement does not list manifest.json")
    try:
        m = json.loads(store.read_blob(by_path["manifest.json"]["sha256"]))
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad("bad_manifest", f"manifest.json is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise _bad("bad_manifest", f"manifest.json format is {m.get('format') if isinstance(m, dict) else None!r}, expected {BUNDLE_FORMAT!r}")
    if m.get("base_model") != st.get("base_model"):
        raise _bad("bad_manifest", f"manifest base_model {m.get('base_model')!r} differs from the statement's {st.get('base_model')!r}")
    adapters = m.get("adapters")
    if not isinstance(adapters, dict) or name not in adapters:
        raise _bad("bad_manifest", f"manifest.json does not list adapter {name!r}")
    if sorted(adapters) != sorted(st.get("adapters", [])):
        raise _bad("bad_manifest", f"manifest adapters {sorted(adapters)} differ from the statement's {st.get('adapters')}")
    mfiles = m.get("files")
    if not isinstance(mfiles, dict):
        raise _bad("bad_manifest", "manifest.json has no `files` map")
    problems = []
    for p, f in by_path.items():
        if p == "manifest.json":
            continue
        e = mfiles.get(p)
        if e is None:
            problems.append(f"{p} is signed but not in manifest files")
        elif not isinstance(e, dict) or e.get("sha256") != f["sha256"] or e.get("size") != f["size"]:
            problems.append(f"{p}: manifest says {e!r}, statement says sha256 {f['sha256']} size {f['size']}")
    problems += [f"{p} is in manifest files but not signed" for p in mfiles if p not in by_path]
    for a, entry in adapters.items():
        core = entry.get("core") if isinstance(entry, dict) else None
        if core not in by_path:
            problems.append(f"core file {core!r} of adapter {a!r} is not listed")
    if "basis.safetensors" not in by_path:
        problems.append("basis.safetensors is not listed")
    if problems:
        raise _bad("bad_manifest", "manifest.json is inconsistent: " + "; ".join(problems))
    return m


def expected_tensors(m: dict[str, Any]) -> dict[str, dict[str, tuple[str | None, tuple[int, ...]]]]:
    """Per file path, the tensors the manifest implies (basis U/V, per-adapter core S)."""
    try:
        k, clusters, method = int(m["rank"]), int(m.get("clusters", 1)), m["method"]
        dtype = _DTYPES.get(m.get("dtype", "float32"))
        shapes = {mod: tuple(int(x) for x in spec["shape"]) for mod, spec in m["modules"].items()}
        if method not in ("full", "diag") or k < 1 or clusters < 1 or any(len(s) != 2 for s in shapes.values()):
            raise ValueError(f"method {method!r}, rank {k}, clusters {clusters}")
        basis: dict[str, tuple[str | None, tuple[int, ...]]] = {}
        for mod, (d_out, d_in) in shapes.items():
            for j in range(clusters):
                pre = mod if clusters == 1 else f"{mod}.c{j}"
                basis[f"{pre}.U"] = (dtype, (d_out, k))
                basis[f"{pre}.V"] = (dtype, (d_in, k))
        core_shape = (k, k) if method == "full" else (k,)
        out = {"basis.safetensors": basis}
        for entry in m["adapters"].values():
            out[entry["core"]] = {f"{mod}.S": (dtype, core_shape) for mod in shapes}
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _bad("bad_manifest", f"manifest.json has malformed rank/method/modules/clusters: {e}") from None


class SafetensorsChecker:
    """validate_safetensors on blobs, remembering (digest, expectation) pairs that passed."""

    def __init__(self) -> None:
        self._ok: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def check(self, store: Storage, files: list[dict[str, Any]], m: dict[str, Any]) -> None:
        expected = expected_tensors(m)
        for f in files:
            if not f["path"].endswith(".safetensors"):
                continue
            exp = expected.get(f["path"])
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
