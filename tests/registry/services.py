"""The registry tests' storage backends: ``sqlite+dir`` (a data dir) and ``postgres+s3`` (one real
PostgreSQL cluster and one real SeaweedFS S3 gateway per session, from soppu_registry.devservices;
a fresh database and bucket per data dir, so per-test isolation costs milliseconds).

A ``Backend`` maps a test's data dir to the options and Storage of one registry; the same data dir
always maps to the same database and bucket, so a restarted server sees its state again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from soppu_registry.devservices import Location, Services
from soppu_registry.storage import Storage

SQLITE, POSTGRES = "sqlite+dir", "postgres+s3"
BACKENDS = (SQLITE, POSTGRES)


@dataclass
class Backend:
    """One storage backend of the suite; ``services`` is None for sqlite+dir."""

    name: str
    services: Services | None = None
    shared: Location | None = None  # replicas: every data dir maps to this one database + bucket
    _locations: dict[Path, Location] = field(default_factory=dict)

    def location(self, data: Path) -> Location | None:
        if self.services is None:
            return None
        if self.shared is not None:
            return self.shared
        key = Path(data).resolve()
        if key not in self._locations:
            self._locations[key] = self.services.fresh()
        return self._locations[key]

    def args(self, data: Path) -> list[str]:
        """The storage options of `soppu-registry` commands for ``data``."""
        loc = self.location(data)
        return ["--data", str(data)] + (loc.args() if loc else [])

    def storage(self, data: Path) -> Storage:
        """Admin access to the same state a server over ``data`` uses."""
        loc = self.location(data)
        return Storage(data, database=loc.database, blobs=loc.blobs) if loc else Storage(data)

    @property
    def env(self) -> dict[str, str]:
        return self.services.env if self.services else {}

    def __str__(self) -> str:
        return self.name


DEFAULT = Backend(SQLITE)
