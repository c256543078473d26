"""GET /v1/bases/<base-model>: basis blobs of published versions, limited to what the caller reads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from soppu_registry.deps import Caller, State

router = APIRouter(tags=["bases"])


@router.get("/v1/bases/{base_model:path}")
def get_bases(base_model: str, caller: Caller, state: State) -> dict[str, Any]:
    out = []
    for b in state.store.bases(base_model):
        users = [u for u in b["used_by"] if caller.can_read(u["owner"])]
        if users:
            out.append({**b, "used_by": users})
    return {"base_model": base_model, "bases": out}
