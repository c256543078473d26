"""SOPPU registry: content-addressed blobs plus signed, atomically published adapter versions.

``create_app(RegistryConfig(...))`` builds the FastAPI app (app.py, one router per resource in
routes/); ``Storage`` is the SQLite + blob store; ``ApiError`` every refusal; ``soppu-registry``
(cli.py) serves and administers a data dir.
"""

from __future__ import annotations

from typing import Any

from soppu_registry.config import RegistryConfig
from soppu_registry.errors import ApiError
from soppu_registry.storage import Storage

__all__ = ["ApiError", "RegistryConfig", "Storage", "create_app"]


def __getattr__(name: str) -> Any:  # keep `import soppu_registry` free of FastAPI for admin commands
    if name == "create_app":
        from soppu_registry.app import create_app
        return create_app
    raise AttributeError(name)
