"""One router per resource; ``create_app`` includes them in this order."""

from __future__ import annotations

from soppu_registry.routes import adapters, bases, blobs, keys, meta

ROUTERS = [meta.router, blobs.router, adapters.router, keys.router, bases.router]
