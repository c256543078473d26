"""SOPPU registry: content-addressed blobs plus signed, atomically published adapter versions.

``create_app(RegistryConfig(...))`` builds the FastAPI app; ``Storage`` is the SQLite + blob store;
``soppu-registry`` (cli.py) serves and administers a data dir.
"""

from __future__ import annotations

from typing import Any

from soppu_registry.storage import ApiError, Storage

__all__ = ["ApiError", "RegistryConfig", "Storage", "create_app"]


def __getattr__(name: str) -> Any:  # keep `import ...registry` free of FastAPI for admin commands
    if name in ("create_app", "RegistryConfig"):
        from soppu_registry import app
        return getattr(app, name)
    raise AttributeError(name)
