"""/v1/adapters/<owner>/<name>: publish a signed version (PUT), read versions (GET);
/v1/bundles/<owner>/versions/<v>: publish every adapter of a signed bundle at once (PUT).

A publish runs every check of ``soppu_registry.checks`` in order, then inserts the version(s) in one
transaction: 201 new, 200 identical re-publish, 409 ``rollback`` / ``conflict`` (a batch: nothing inserted).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from soppu_client.format.refs import AdapterRef
from soppu_registry import checks
from soppu_registry.auth import Principal
from soppu_registry.bodies import INT64_MAX, body_chunks, loads_bounded, refuse_declared_over
from soppu_registry.deps import AdapterPath, BlobHex, Caller, OwnerPath, RegistryState, State
from soppu_registry.errors import ApiError

router = APIRouter(tags=["adapters"])

PUBLISH_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["signature"],
    "properties": {"signature": {"type": "object", "description": "contents of the bundle's signature.json"}}}}}}}

VERSION_FIELDS = ("owner", "name", "version", "base_model", "signature", "files", "published_at")


def version_view(v: dict[str, Any]) -> dict[str, Any]:
    """A stored version as the API shows it."""
    return {k: v[k] for k in VERSION_FIELDS}


_VERSION_RE = re.compile(r"[0-9]{1,19}")


async def version_path(version: Annotated[str, Path(
        description=f"a version number, 1 to {INT64_MAX} in ASCII digits",
        json_schema_extra={"pattern": r"^[0-9]{1,19}$"})]) -> int:
    """``{version}``: ASCII digits, 1..INT64_MAX (SQLite's integer range); else 400 ``bad_request``."""
    if not _VERSION_RE.fullmatch(version) or not 1 <= int(version) <= INT64_MAX:  # `$` let "1\n" in
        raise ApiError(400, "bad_request", f"version must be an integer from 1 to {INT64_MAX} in ASCII digits, "
                                           f"got {version!r}")
    return int(version)


VersionPath = Annotated[int, Depends(version_path)]


def _checked_statement(state: RegistryState, owner: str, name: str | None, version: int,
                       body: bytearray) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every publish check of ``soppu_registry.checks``, in order, once for the signed bundle
    (``name``: the one adapter the URL names; None: the batch publish, every adapter of the
    statement). Returns (signature document, verified statement)."""
    doc = loads_bounded(body, "publish body")
    if not isinstance(doc, dict) or "signature" not in doc:
        raise ApiError(400, "bad_request", "body must be {\"signature\": <signature.json>}")
    store, sig = state.store, doc["signature"]
    st = checks.check_signature(store, sig, owner, name, version)
    files = st["files"]
    checks.check_blobs(store, files, owner)
    manifest = checks.check_manifest(store, st, files, name)
    state.safetensors.check_metrics(store, files, manifest)
    checks.check_rank(manifest, state.config.max_rank, state.config.max_served_params)
    state.safetensors.check(store, files, manifest)
    return sig, st


def _publish_checked(state: RegistryState, ref: AdapterRef, version: int, body: bytearray) -> JSONResponse:
    sig, st = _checked_statement(state, ref.owner, ref.name, version, body)
    status = state.store.publish(ref.owner, ref.name, version, str(st["base_model"]), sig, st["files"])
    stored = state.store.get_version(ref.owner, ref.name, version)
    assert stored is not None  # just inserted or identical; versions are never deleted
    return JSONResponse(version_view(stored), status_code=status)


def _publish_bundle_checked(state: RegistryState, owner: str, version: int, body: bytearray) -> JSONResponse:
    sig, st = _checked_statement(state, owner, None, version, body)
    statuses = state.store.publish_bundle(owner, list(st["adapters"]), version, str(st["base_model"]), sig, st["files"])
    return JSONResponse({"owner": owner, "version": version, "base_model": st["base_model"],
                         "adapters": {n: "created" if s == 201 else "unchanged" for n, s in statuses.items()}},
                        status_code=201 if 201 in statuses.values() else 200)


async def _publish_body(caller: Principal, owner: str, state: RegistryState, request: Request) -> bytearray:
    """Authorize from the headers, then read the body under ``max_publish_bytes`` / ``body_idle_timeout``."""
    if not caller.can_write(owner):
        raise ApiError(403, "forbidden", f"publishing to owner {owner!r} needs that owner's owner-write token")
    cap, idle = state.config.max_publish_bytes, state.config.body_idle_timeout
    refuse_declared_over(request, cap, "publish body")
    body = bytearray()
    async for chunk in body_chunks(request, idle, "publish body"):
        body += chunk
        if len(body) > cap:
            raise ApiError(413, "too_large", f"publish body exceeds the limit of {cap} bytes")
    return body


@router.put("/v1/adapters/{owner}/{name}/versions/{version}", status_code=201, openapi_extra=PUBLISH_BODY_SCHEMA)
async def publish(ref: AdapterPath, version: VersionPath, caller: Caller, state: State,
                  request: Request) -> JSONResponse:
    """Publish a signed version: 201 new, 200 identical re-publish, 409 rollback/conflict.

    The caller is authorized from the headers before any of the body is read; a declared
    Content-Length over ``max_publish_bytes`` is 413 at once, a longer body 413 while reading,
    a stalled one 408 after ``body_idle_timeout``."""
    body = await _publish_body(caller, ref.owner, state, request)
    return await run_in_threadpool(_publish_checked, state, ref, version, body)


@router.put("/v1/bundles/{owner}/versions/{version}", status_code=201, openapi_extra=PUBLISH_BODY_SCHEMA)
async def publish_bundle(owner: OwnerPath, version: VersionPath, caller: Caller, state: State,
                         request: Request) -> JSONResponse:
    """Batch publish: every adapter of the signed bundle in ONE transaction, after the same checks
    as the per-adapter publish (run once for the bundle). 201 if any adapter was created, 200 if
    all were identical re-publishes; the body lists each adapter as "created" or "unchanged".
    All or nothing: if any adapter would be a 409 rollback/conflict, no version becomes visible."""
    body = await _publish_body(caller, owner, state, request)
    return await run_in_threadpool(_publish_bundle_checked, state, owner, version, body)


def _check_readable(caller: Principal, owner: str) -> None:
    if not caller.can_read(owner):
        raise ApiError(403, "forbidden", f"token cannot read adapters of owner {owner!r}")


def _version_or_404(state: RegistryState, ref: AdapterRef, version: int | None) -> dict[str, Any]:
    v = state.store.get_version(ref.owner, ref.name, version)
    if v is None:
        which = "any version" if version is None else f"version {version}"
        raise ApiError(404, "not_found", f"{ref.owner}/{ref.name} has no published {which}")
    return version_view(v)


# ?signature=ref: the answer names the signature document by digest instead of carrying it (and the
# files list, which the signed statement holds too), so a serving host fetches a bundle's document once
# (GET /v1/signatures/sha256:<hex>) however many of its adapters it resolves.
SignatureMode = Annotated[str | None, Query(alias="signature", pattern="^ref$", description=(
    "`ref`: answer `signature_sha256` (the signature document's digest, see GET /v1/signatures/{digest}) "
    "instead of `signature` and `files`"))]
REF_FIELDS = ("owner", "name", "version", "base_model", "published_at")


def _version_answer(state: RegistryState, ref: AdapterRef, version: int | None, mode: str | None) -> dict[str, Any]:
    if mode != "ref":
        return _version_or_404(state, ref, version)
    v = state.store.get_version_ref(ref.owner, ref.name, version)
    if v is None:
        which = "any version" if version is None else f"version {version}"
        raise ApiError(404, "not_found", f"{ref.owner}/{ref.name} has no published {which}")
    return {**{k: v[k] for k in REF_FIELDS}, "signature_sha256": v["sig_digest"]}


@router.get("/v1/adapters/{owner}/{name}")
def get_latest(ref: AdapterPath, caller: Caller, state: State, signature: SignatureMode = None) -> dict[str, Any]:
    """The latest published version (owner read/write or serving-read)."""
    _check_readable(caller, ref.owner)
    return _version_answer(state, ref, None, signature)


@router.get("/v1/adapters/{owner}/{name}/versions/{version}")
def get_version(ref: AdapterPath, version: VersionPath, caller: Caller, state: State,
                signature: SignatureMode = None) -> dict[str, Any]:
    """One published version (owner read/write or serving-read)."""
    _check_readable(caller, ref.owner)
    return _version_answer(state, ref, version, signature)


@router.get("/v1/signatures/{digest}", response_class=Response,
            responses={200: {"content": {"application/json": {}}}})
def get_signature(hexd: BlobHex, caller: Caller, state: State) -> Response:
    """A published signature document by the sha256 of its stored bytes (the body is those bytes), for
    a caller that may read a version referencing it; anyone else gets the 404 of an absent one."""
    found = state.store.signature_doc(hexd)
    if found is None or not any(caller.can_read(owner) for owner in found[0]):
        raise ApiError(404, "not_found", f"no published signature document sha256:{hexd}")
    return Response(content=found[1].encode("utf-8"), media_type="application/json")


@router.get("/v1/adapters/{owner}/{name}/versions")
def list_versions(ref: AdapterPath, caller: Caller, state: State) -> dict[str, Any]:
    """The published version numbers, ascending."""
    _check_readable(caller, ref.owner)
    return {"owner": ref.owner, "name": ref.name, "versions": state.store.list_versions(ref.owner, ref.name)}
