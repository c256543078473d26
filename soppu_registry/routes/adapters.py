"""/v1/adapters/<owner>/<name>: publish a signed version (PUT), read versions (GET).

A publish runs every check of ``soppu_registry.checks`` in order, then inserts the version in one
transaction: 201 new, 200 identical re-publish, 409 ``rollback`` / ``conflict``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from soppu_client.format.refs import AdapterRef
from soppu_registry import checks
from soppu_registry.auth import Principal
from soppu_registry.deps import AdapterPath, Caller, RegistryState, State
from soppu_registry.errors import ApiError

router = APIRouter(tags=["adapters"])

MAX_PUBLISH_BODY = 16 << 20

PUBLISH_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["signature"],
    "properties": {"signature": {"type": "object", "description": "contents of the bundle's signature.json"}}}}}}}

VERSION_FIELDS = ("owner", "name", "version", "base_model", "signature", "files", "published_at")


def version_view(v: dict[str, Any]) -> dict[str, Any]:
    """A stored version as the API shows it."""
    return {k: v[k] for k in VERSION_FIELDS}


async def publish_version(version: int) -> int:
    if version < 0:
        raise ApiError(400, "bad_request", f"version must be a non-negative integer, got {version}")
    return version


def _publish_checked(state: RegistryState, ref: AdapterRef, version: int, body: bytes) -> JSONResponse:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ApiError(400, "bad_request", f"body is not JSON: {e}") from None
    if not isinstance(doc, dict) or "signature" not in doc:
        raise ApiError(400, "bad_request", "body must be {\"signature\": <signature.json>}")
    store, owner, name, sig = state.store, ref.owner, ref.name, doc["signature"]
    st = checks.check_signature(store, sig, owner, name, version)
    files = st["files"]
    checks.check_blobs(store, files)
    manifest = checks.check_manifest(store, st, files, name)
    state.safetensors.check(store, files, manifest)
    status = store.publish(owner, name, version, str(st["base_model"]), sig, files)
    stored = store.get_version(owner, name, version)
    assert stored is not None  # just inserted or identical; versions are never deleted
    return JSONResponse(version_view(stored), status_code=status)


@router.put("/v1/adapters/{owner}/{name}/versions/{version}", status_code=201, openapi_extra=PUBLISH_BODY_SCHEMA)
async def publish(ref: AdapterPath, version: Annotated[int, Depends(publish_version)], caller: Caller,
                  state: State, request: Request) -> JSONResponse:
    """Publish a signed version: 201 new, 200 identical re-publish, 409 rollback/conflict."""
    if not caller.can_write(ref.owner):
        raise ApiError(403, "forbidden", f"publishing to owner {ref.owner!r} needs that owner's owner-write token")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_PUBLISH_BODY:
                raise ApiError(413, "too_large", f"publish body exceeds {MAX_PUBLISH_BODY} bytes")
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "publish request ended before its body") from None
    return await run_in_threadpool(_publish_checked, state, ref, version, bytes(body))


def _check_readable(caller: Principal, owner: str) -> None:
    if not caller.can_read(owner):
        raise ApiError(403, "forbidden", f"token cannot read adapters of owner {owner!r}")


def _version_or_404(state: RegistryState, ref: AdapterRef, version: int | None) -> dict[str, Any]:
    v = state.store.get_version(ref.owner, ref.name, version)
    if v is None:
        which = "any version" if version is None else f"version {version}"
        raise ApiError(404, "not_found", f"{ref.owner}/{ref.name} has no published {which}")
    return version_view(v)


@router.get("/v1/adapters/{owner}/{name}")
def get_latest(ref: AdapterPath, caller: Caller, state: State) -> dict[str, Any]:
    """The latest published version (owner read/write or serving-read)."""
    _check_readable(caller, ref.owner)
    return _version_or_404(state, ref, None)


@router.get("/v1/adapters/{owner}/{name}/versions/{version}")
def get_version(ref: AdapterPath, version: int, caller: Caller, state: State) -> dict[str, Any]:
    """One published version (owner read/write or serving-read)."""
    _check_readable(caller, ref.owner)
    return _version_or_404(state, ref, version)


@router.get("/v1/adapters/{owner}/{name}/versions")
def list_versions(ref: AdapterPath, caller: Caller, state: State) -> dict[str, Any]:
    """The published version numbers, ascending."""
    _check_readable(caller, ref.owner)
    return {"owner": ref.owner, "name": ref.name, "versions": state.store.list_versions(ref.owner, ref.name)}
