"""/v1/adapters/<owner>/<name>: publish a signed version (PUT), read versions (GET).

A publish runs every check of ``soppu_registry.checks`` in order, then inserts the version in one
transaction: 201 new, 200 identical re-publish, 409 ``rollback`` / ``conflict``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from soppu_client.format.refs import AdapterRef
from soppu_registry import checks
from soppu_registry.auth import Principal
from soppu_registry.bodies import INT64_MAX, body_chunks, loads_bounded, refuse_declared_over
from soppu_registry.deps import AdapterPath, Caller, RegistryState, State
from soppu_registry.errors import ApiError

router = APIRouter(tags=["adapters"])

PUBLISH_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["signature"],
    "properties": {"signature": {"type": "object", "description": "contents of the bundle's signature.json"}}}}}}}

VERSION_FIELDS = ("owner", "name", "version", "base_model", "signature", "files", "published_at")


def version_view(v: dict[str, Any]) -> dict[str, Any]:
    """A stored version as the API shows it."""
    return {k: v[k] for k in VERSION_FIELDS}


_VERSION_RE = re.compile(r"^[0-9]{1,19}$")


async def version_path(version: Annotated[str, Path(
        description=f"a version number, 1 to {INT64_MAX} in ASCII digits",
        json_schema_extra={"pattern": r"^[0-9]{1,19}$"})]) -> int:
    """``{version}``: ASCII digits, 1..INT64_MAX (SQLite's integer range); else 400 ``bad_request``."""
    if not _VERSION_RE.match(version) or not 1 <= int(version) <= INT64_MAX:
        raise ApiError(400, "bad_request", f"version must be an integer from 1 to {INT64_MAX} in ASCII digits, "
                                           f"got {version!r}")
    return int(version)


VersionPath = Annotated[int, Depends(version_path)]


def _publish_checked(state: RegistryState, ref: AdapterRef, version: int, body: bytearray) -> JSONResponse:
    doc = loads_bounded(body, "publish body")
    if not isinstance(doc, dict) or "signature" not in doc:
        raise ApiError(400, "bad_request", "body must be {\"signature\": <signature.json>}")
    store, owner, name, sig = state.store, ref.owner, ref.name, doc["signature"]
    st = checks.check_signature(store, sig, owner, name, version)
    files = st["files"]
    checks.check_blobs(store, files, owner)
    manifest = checks.check_manifest(store, st, files, name)
    checks.check_rank(manifest, state.config.max_rank)
    state.safetensors.check(store, files, manifest)
    status = store.publish(owner, name, version, str(st["base_model"]), sig, files)
    stored = store.get_version(owner, name, version)
    assert stored is not None  # just inserted or identical; versions are never deleted
    return JSONResponse(version_view(stored), status_code=status)


@router.put("/v1/adapters/{owner}/{name}/versions/{version}", status_code=201, openapi_extra=PUBLISH_BODY_SCHEMA)
async def publish(ref: AdapterPath, version: VersionPath, caller: Caller, state: State,
                  request: Request) -> JSONResponse:
    """Publish a signed version: 201 new, 200 identical re-publish, 409 rollback/conflict.

    The caller is authorized from the headers before any of the body is read; a declared
    Content-Length over ``max_publish_bytes`` is 413 at once, a longer body 413 while reading,
    a stalled one 408 after ``body_idle_timeout``."""
    if not caller.can_write(ref.owner):
        raise ApiError(403, "forbidden", f"publishing to owner {ref.owner!r} needs that owner's owner-write token")
    cap, idle = state.config.max_publish_bytes, state.config.body_idle_timeout
    refuse_declared_over(request, cap, "publish body")
    body = bytearray()
    async for chunk in body_chunks(request, idle, "publish body"):
        body += chunk
        if len(body) > cap:
            raise ApiError(413, "too_large", f"publish body exceeds the limit of {cap} bytes")
    return await run_in_threadpool(_publish_checked, state, ref, version, body)


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
def get_version(ref: AdapterPath, version: VersionPath, caller: Caller, state: State) -> dict[str, Any]:
    """One published version (owner read/write or serving-read)."""
    _check_readable(caller, ref.owner)
    return _version_or_404(state, ref, version)


@router.get("/v1/adapters/{owner}/{name}/versions")
def list_versions(ref: AdapterPath, caller: Caller, state: State) -> dict[str, Any]:
    """The published version numbers, ascending."""
    _check_readable(caller, ref.owner)
    return {"owner": ref.owner, "name": ref.name, "versions": state.store.list_versions(ref.owner, ref.name)}
