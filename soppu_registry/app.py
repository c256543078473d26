"""The registry's HTTP API (FastAPI). OpenAPI at /openapi.json, docs at /docs.

    PUT  /v1/blobs/sha256:<hex>                      owner-write; streamed, digest/size/cap checked
    HEAD /v1/blobs/sha256:<hex>                      any valid token; 200 + size, or 404
    GET  /v1/blobs/sha256:<hex>                      serving-read, or a reader of a version using it
    PUT  /v1/adapters/<owner>/<name>/versions/<v>    owner-write; {"signature": <signature.json>}
    GET  /v1/adapters/<owner>/<name>[/versions/<v>]  owner read/write or serving-read
    GET  /v1/adapters/<owner>/<name>/versions        list of published version numbers
    GET  /v1/keys/<owner>                            any valid token; active and rotated keys
    GET  /v1/bases/<base-model>                      basis blobs visible to the caller
    GET  /healthz                                    no token

Errors are JSON ``{"error": {"code": ..., "message": ...}}``; 429 carries Retry-After.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from soppu_registry.config import RegistryConfig
from soppu_registry.deps import RegistryState
from soppu_registry.errors import ApiError
from soppu_registry.routes import ROUTERS

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "too_large"}


def create_app(config: RegistryConfig) -> FastAPI:
    """The registry app over ``config.data_dir``: every router, and one error shape for every failure."""
    app = FastAPI(title="SOPPU registry", version="1", description=__doc__)
    app.state.registry = RegistryState.open(config)
    for router in ROUTERS:
        app.include_router(router)
    _install_error_handlers(app)
    return app


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body; the code is repeated in X-Soppu-Error-Code for HEAD (no body)."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers={**(headers or {}), "X-Soppu-Error-Code": code})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, _HTTP_CODES.get(e.status_code, "http_error"), str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        return error_response(400, "bad_request", msg)
