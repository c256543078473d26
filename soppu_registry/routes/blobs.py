"""/v1/blobs/sha256:<hex>: streamed, checked uploads (PUT), existence (HEAD), downloads (GET)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from soppu_registry.auth import OWNER_WRITE, Principal
from soppu_registry.bodies import body_chunks, header_int
from soppu_registry.deps import BlobHex, Caller, RegistryState, State
from soppu_registry.errors import ApiError
from soppu_registry.storage import quota_error

router = APIRouter(tags=["blobs"])

BLOB_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


@router.put("/v1/blobs/{digest}", status_code=201, openapi_extra=BLOB_BODY_SCHEMA)
async def put_blob(digest: str, hexd: BlobHex, caller: Caller, state: State, request: Request) -> JSONResponse:
    """Stream a blob (owner-write); the caller's owner owns it afterwards (re-sending stored bytes
    proves possession). Content-Length and the optional X-Soppu-Size must agree with the body; the
    size cap and the owner's unpublished-bytes quota (413 ``quota_exceeded``) are enforced from the
    declared size, while streaming and again at commit. 201 stored, 200 already present."""
    if OWNER_WRITE not in caller.scopes:
        raise ApiError(403, "forbidden", "uploading blobs needs an owner-write token")
    cap = state.config.max_blob_bytes
    clen, declared = header_int(request, "content-length"), header_int(request, "x-soppu-size")
    if clen is not None and declared is not None and clen != declared:
        raise ApiError(400, "size_mismatch", f"Content-Length {clen} differs from X-Soppu-Size {declared}")
    expected = declared if declared is not None else clen
    if expected is not None and expected > cap:
        raise ApiError(413, "too_large", f"blob {digest} of {expected} bytes exceeds the limit of {cap} bytes")
    owner = caller.owner
    assert owner is not None  # owner-write tokens are bound to an owner (issue_token)
    room = await run_in_threadpool(state.store.quota_room, owner, hexd, state.quota)
    if room is not None and expected is not None and expected > room:  # refused before the body
        raise quota_error(owner, state.quota or 0, (state.quota or 0) - room, hexd, expected)
    writer = state.store.blob_writer(hexd, expected, cap, owner, state.quota, room)
    try:  # 408 after body_idle_timeout without a chunk, 400 on disconnect: the temp file goes either way
        async for chunk in body_chunks(request, state.config.body_idle_timeout, f"upload of {digest}"):
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    res = await run_in_threadpool(writer.commit)
    return JSONResponse({"digest": res.digest, "size": res.size, "created": res.created},
                        status_code=201 if res.created else 200)


def _readable_size(state: RegistryState, caller: Principal, hexd: str) -> tuple[int, bool] | None:
    """(size, caller's owner owns it) of a blob the caller may read (``Principal.can_read_blob``);
    None when it is absent *or* unreadable, so both get the same 404."""
    store = state.store
    owners = store.blob_owners(hexd)
    if not caller.can_read_blob(owners, store.blob_referenced_by(hexd)):
        return None
    size = store.blob_size(hexd)
    return None if size is None else (size, caller.owner in owners)


@router.head("/v1/blobs/{digest}")
def head_blob(digest: str, hexd: BlobHex, caller: Caller, state: State) -> Response:
    """200 with the size when the caller may read the blob (one of its owners, or a reader of a
    published version listing it), else 404. An owner's HEAD restarts the blob's gc grace period."""
    found = _readable_size(state, caller, hexd)
    if found is None:
        return Response(status_code=404)
    size, owned = found
    if owned:  # the client will publish against it: restart its gc grace period
        state.store.touch_blob(hexd, caller.owner or "")
    return Response(status_code=200, headers={"content-length": str(size), "x-soppu-size": str(size),
                                              "docker-content-digest": digest})


@router.get("/v1/blobs/{digest}", response_class=FileResponse)
def get_blob(digest: str, hexd: BlobHex, caller: Caller, state: State) -> Response:
    """The blob's bytes, for its owners and readers of a published version listing it; 404 for an
    absent blob and for one the caller may not read alike."""
    if _readable_size(state, caller, hexd) is None:
        raise ApiError(404, "not_found", f"blob {digest} not found among the blobs this token can read")
    headers = {"docker-content-digest": digest}
    local = state.store.blobs.local_file(hexd)
    if local is not None:
        return FileResponse(local, media_type="application/octet-stream", headers=headers)
    size = state.store.blob_size(hexd)  # S3: streamed through, with its length
    return StreamingResponse(state.store.blobs.iter_bytes(hexd), media_type="application/octet-stream",
                             headers={**headers, "content-length": str(size)})
