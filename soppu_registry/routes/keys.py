"""GET /v1/keys/<owner>: an owner's active and rotated signing keys (any valid token)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from soppu_registry.deps import Caller, OwnerPath, State
from soppu_registry.errors import ApiError

router = APIRouter(tags=["keys"])


@router.get("/v1/keys/{owner}")
def get_keys(owner: OwnerPath, _: Caller, state: State) -> dict[str, Any]:
    if not state.store.owner_exists(owner):
        raise ApiError(404, "not_found", f"owner {owner!r} does not exist")
    return {"owner": owner, "keys": state.store.keys(owner)}
