"""Server settings of one registry process (`soppu-registry serve` options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RegistryConfig:
    """`data_dir` holds the SQLite database and blobs; `max_blob_bytes` caps one blob;
    `rate` (requests/s, <= 0 disables) and `burst` size the per-token bucket."""

    data_dir: Path
    max_blob_bytes: int = 1 << 30
    rate: float = 100.0
    burst: float = 1000.0

    def __post_init__(self) -> None:
        if self.max_blob_bytes < 1:
            raise ValueError(f"`max_blob_bytes` must be positive, got {self.max_blob_bytes}")
        if self.burst < 1:
            raise ValueError(f"`burst` must be >= 1, got {self.burst}")
