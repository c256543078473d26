"""Every name rule and format constant of SOPPU, defined once.

Names (owners, adapters, digests) are checked with these patterns by the client, the registry and
the serving side alike; format tags identify every JSON document and directory layout we write.

Every pattern ends with ``\\Z`` (never ``$``, which also matches before a final newline, so
``"evil\\n"`` passed) and uses explicit ASCII classes, so ``.match`` and ``.fullmatch`` agree.
"""

from __future__ import annotations

import re

# -- names ----------------------------------------------------------------------------------------
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
"""An adapter name: the directory name of a source adapter, the registry name, a core file stem."""
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
"""A registry owner (tenant)."""
HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
"""A sha256 hex digest (lower case)."""
DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})\Z")
"""A blob reference in the registry API: ``sha256:<hex>``."""

# -- format tags ----------------------------------------------------------------------------------
BUNDLE_FORMAT = "soppu-bundle/1"
STATEMENT_FORMAT = "soppu-statement/1"
ROTATION_FORMAT = "soppu-key-rotation/1"
COMPRESSED_FORMAT = "soppu-compressed/1"
SOURCE_MARKER_FORMAT = "soppu-source/1"

# -- file names -----------------------------------------------------------------------------------
MANIFEST = "manifest.json"
BASIS = "basis.safetensors"
SIGNATURE = "signature.json"
METRICS = "metrics.json"

# -- environment ----------------------------------------------------------------------------------
MODEL_CACHE_ENV = "SOPPU_MODEL_CACHE"
"""Where the owner's side keeps the converted embedded base model (default ``~/.cache/soppu``)."""
PASSPHRASE_ENV = "SOPPU_KEY_PASSPHRASE"
"""Passphrase of an encrypted private key (read by the owner's CLI)."""
REGISTRY_URL_ENV = "SOPPU_REGISTRY_URL"
"""Registry base URL (the owner's CLI and the serving side)."""
REGISTRY_TOKEN_ENV = "SOPPU_REGISTRY_TOKEN"
"""Registry token (the owner's CLI; the serving side's token for requests without api_token)."""


def core_path(name: str) -> str:
    """Bundle-relative path of adapter ``name``'s core file."""
    return f"cores/{name}.safetensors"


def basis_key(module: str, side: str, cluster: int, n_clusters: int) -> str:
    """Tensor name of a basis factor: "<module>.U" or, with clusters, "<module>.c<j>.U"."""
    return f"{module}.{side}" if n_clusters == 1 else f"{module}.c{cluster}.{side}"
