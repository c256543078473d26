"""/v1/blobs/sha256:<hex>: streamed, checked uploads (PUT), existence (HEAD), downloads (GET)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from soppu_registry.auth import OWNER_WRITE
from soppu_registry.deps import BlobHex, Caller, State
from soppu_registry.errors import ApiError

router = APIRouter(tags=["blobs"])

BLOB_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


def _header_int(request: Request, header: str) -> int | None:
    v = request.headers.get(header)
    if v is None:
        return None
    if not v.isdigit():
        raise ApiError(400, "bad_request", f"header {header} must be a non-negative integer, got {v!r}")
    return int(v)


@router.put("/v1/blobs/{digest}", status_code=201, openapi_extra=BLOB_BODY_SCHEMA)
async def put_blob(digest: str, hexd: BlobHex, caller: Caller, state: State, request: Request) -> JSONResponse:
    """Stream a blob (owner-write). Content-Length and the optional X-Soppu-Size must agree with the
    body; the size cap is enforced while streaming. 201 stored, 200 already present."""
    if OWNER_WRITE not in caller.scopes:
        raise ApiError(403, "forbidden", "uploading blobs needs an owner-write token")
    cap = state.config.max_blob_bytes
    clen, declared = _header_int(request, "content-length"), _header_int(request, "x-soppu-size")
    if clen is not None and declared is not None and clen != declared:
        raise ApiError(400, "size_mismatch", f"Content-Length {clen} differs from X-Soppu-Size {declared}")
    expected = declared if declared is not None else clen
    if expected is not None and expected > cap:
        raise ApiError(413, "too_large", f"blob {digest} of {expected} bytes exceeds the limit of {cap} bytes")
    writer = state.store.blob_writer(hexd, expected, cap)
    try:
        async for chunk in request.stream():
            if chunk:
                writer.write(chunk)
    except ClientDisconnect:  # upload cut off: nothing was stored; nobody reads this answer
        writer.abort()
        raise ApiError(400, "client_disconnected", f"upload of {digest} ended after {writer.size} bytes") from None
    except BaseException:
        writer.abort()
        raise
    res = await run_in_threadpool(writer.commit)
    return JSONResponse({"digest": res.digest, "size": res.size, "created": res.created},
                        status_code=201 if res.created else 200)


@router.head("/v1/blobs/{digest}")
def head_blob(digest: str, hexd: BlobHex, _: Caller, state: State) -> Response:
    """200 with the size when stored (restarting its gc grace period), else 404; any valid token."""
    size = state.store.blob_size(hexd)
    if size is None:
        return Response(status_code=404)
    state.store.touch_blob(hexd)  # the client will publish against it: restart its gc grace period
    return Response(status_code=200, headers={"content-length": str(size), "x-soppu-size": str(size),
                                              "docker-content-digest": digest})


@router.get("/v1/blobs/{digest}", response_class=FileResponse)
def get_blob(digest: str, hexd: BlobHex, caller: Caller, state: State) -> Response:
    """The blob's bytes, for serving-read tokens or a reader of a published version listing it."""
    store = state.store
    if not caller.can_read_any_blob and not any(caller.can_read(o) for o in store.blob_referenced_by(hexd)):
        raise ApiError(404, "not_found", f"blob {digest} not found among the versions this token can read")
    path = store.blob_path(hexd)
    if not path.exists():
        raise ApiError(404, "not_found", f"blob {digest} not found")
    return FileResponse(path, media_type="application/octet-stream", headers={"docker-content-digest": digest})
