"""``owner/name[@version]``: how the registry, its clients and the LoRAX source name a published adapter."""

from __future__ import annotations

from dataclasses import dataclass

from soppu_client.format.errors import InputError
from soppu_client.format.names import ADAPTER_NAME_RE, OWNER_RE

__all__ = ["AdapterRef"]


MAX_VERSION = 2**63 - 1  # versions are signed 64-bit integers everywhere (SQLite, PostgreSQL)


def _is_version(text: str) -> bool:
    """ASCII digits naming a version in 1..MAX_VERSION (``str.isdigit`` alone accepts ``²``)."""
    return text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_VERSION


@dataclass(frozen=True)
class AdapterRef:
    """``owner/name[@version]`` parsed; ``version`` None means the latest published."""

    owner: str
    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str, revision: str | None = None, *, label: str = "soppu adapter id") -> AdapterRef:
        """``revision`` (LoRAX's field) pins the version when the text has no ``@``; ``label``
        starts the error message (what the user typed this as)."""
        body = (text or "").strip()
        version: int | None = None
        if "@" in body:
            body, _, v = body.rpartition("@")
            if not _is_version(v):
                raise InputError(f"{label} {text!r}: version after '@' must be an integer from 1 to {MAX_VERSION}, "
                                 f"got {v!r}")
            version = int(v)
        elif revision and _is_version(str(revision)):
            version = int(revision)
        owner, sep, name = body.partition("/")
        if not sep or not OWNER_RE.match(owner) or not ADAPTER_NAME_RE.match(name):
            raise InputError(
                f"{label} {text!r} must look like `owner/name` or `owner/name@version` "
                f"(owner {OWNER_RE.pattern}, name {ADAPTER_NAME_RE.pattern})"
            )
        return cls(owner, name, version)

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}" + (f"@{self.version}" if self.version is not None else "")
