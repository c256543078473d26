"""``owner/name[@version]``: how the registry, its clients and the LoRAX source name a published adapter."""

from __future__ import annotations

from dataclasses import dataclass

from soppu_client.format.errors import InputError
from soppu_client.format.names import ADAPTER_NAME_RE, OWNER_RE

__all__ = ["AdapterRef"]


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
            if not v.isdigit():
                raise InputError(f"{label} {text!r}: version after '@' must be an integer, got {v!r}")
            version = int(v)
        elif revision and str(revision).isdigit():
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
