"""Every setting of the serving side, read from ``SOPPU_*`` environment variables in one place.

    SOPPU_REGISTRY_URL      registry base URL, e.g. http://registry:8080 (needed to fetch; unset: a
                            clear error at the first fetch, so cache-only tools work without it)
    SOPPU_REGISTRY_TOKEN    token used when a request carries none (e.g. adapters preloaded at start)
    SOPPU_CACHE_DIR         cache root (default: <HUGGINGFACE_HUB_CACHE>/soppu, LoRAX's cache)
    SOPPU_TRUSTED_KEYS      dir of pinned owner keys (recommended): ``<owner>.pub`` and/or
                            ``<owner>/*.pub`` (several keys per owner, so a rotation can keep the
                            old and the new key); a signature must be by one of them. Unset: trust
                            on first use: the first key the registry lists for an owner (its id
                            recomputed from the key bytes), later ones only through the registry's
                            rotation proofs (soppu_serving.trust); warn once per process at start-up
    SOPPU_SERVE_FORMAT      ``peft`` (default: a standard LoRA dir, stock LoRAX kernels) or
                            ``compressed`` (basis + cores, for a LoRAX with patches 0005-0008)
    SOPPU_REGISTRY_RETRIES  extra attempts per registry request (default 2)
    SOPPU_REGISTRY_TIMEOUT  seconds to connect and per read of a registry request, and for the whole
                            of a JSON answer (default 30)
    SOPPU_REGISTRY_MAX_JSON_BYTES  bytes a JSON answer (version record, keys) may have (default
                            4194304 = 4 MiB); a longer one is cut and refused
    SOPPU_DOWNLOAD_DEADLINE seconds one blob download may take, start to last byte (default 600);
                            past it the download is cut and nothing is cached
    SOPPU_SERVED_BASE_MODEL the base model name (a bundle's ``base_model``, e.g.
                            HuggingFaceTB/SmolLM2-135M-Instruct) that the engine serves under another
                            name, e.g. a local model dir; bundles naming it are accepted (the vLLM
                            resolver; default: only bundles naming the served model path itself)
    SOPPU_MAX_SERVED_RANK   largest k of any module a host materializes (default 128): checked on
                            the verified manifest before any tensor is downloaded, so one adapter
                            never becomes more than 128 (d_out + d_in) parameters per module of the
                            base model it targets, however small its core was on the wire
    SOPPU_RESOLVE_TTL       seconds a version lookup (and the registry's key) is reused within a
                            process (default 5); the signature and the expiry are checked again on
                            every resolution, warm or cold

Entry points (the LoRAX source, ``soppu-cache``) build one :class:`Settings` with
:meth:`Settings.from_env` and pass it down; no other module reads these variables. An unset or
empty variable means its default. A bad value is an :class:`InputError` naming the variable and
the value.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from soppu_client.format.errors import InputError
from soppu_client.format.names import REGISTRY_TOKEN_ENV, REGISTRY_URL_ENV
from soppu_client.registry_client import DOWNLOAD_DEADLINE, MAX_JSON_BYTES
from soppu_serving.cache import FORMS

__all__ = ["Settings", "warn_if_unpinned"]

log = logging.getLogger("soppu_serving")
_warned: set[str] = set()  # registry URLs already warned about in this process
_warn_lock = threading.Lock()

# field -> environment variable (one name per setting)
_ENV = {
    "registry_url": REGISTRY_URL_ENV,  # the same names as the `soppu` CLI's
    "registry_token": REGISTRY_TOKEN_ENV,
    "cache_dir": "SOPPU_CACHE_DIR",
    "trusted_keys": "SOPPU_TRUSTED_KEYS",
    "serve_format": "SOPPU_SERVE_FORMAT",
    "registry_retries": "SOPPU_REGISTRY_RETRIES",
    "registry_timeout": "SOPPU_REGISTRY_TIMEOUT",
    "max_json_bytes": "SOPPU_REGISTRY_MAX_JSON_BYTES",
    "download_deadline": "SOPPU_DOWNLOAD_DEADLINE",
    "resolve_ttl": "SOPPU_RESOLVE_TTL",
    "served_base_model": "SOPPU_SERVED_BASE_MODEL",
    "max_served_rank": "SOPPU_MAX_SERVED_RANK",
}

MAX_SERVED_RANK = 128


@dataclass(frozen=True)
class Settings:
    """The serving side's settings (each documented with its variable above).

    :meth:`from_env` passes each variable's text; ``__post_init__`` converts and validates every
    field, so a value given in code is checked the same way."""

    registry_url: str | None = None
    registry_token: str | None = None
    cache_dir: Path | None = None
    trusted_keys: Path | None = None
    serve_format: str = "peft"
    registry_retries: int = 2
    registry_timeout: float = 30.0
    max_json_bytes: int = MAX_JSON_BYTES
    download_deadline: float = DOWNLOAD_DEADLINE
    resolve_ttl: float = 5.0
    served_base_model: str | None = None
    max_served_rank: int = MAX_SERVED_RANK

    def __post_init__(self) -> None:
        url = self.registry_url
        if url is not None and not str(url).startswith(("http://", "https://")):
            raise InputError(f"SOPPU_REGISTRY_URL={url!r} must be an http(s) URL, e.g. http://registry:8080")
        self._set("registry_url", str(url).rstrip("/") if url is not None else None)
        self._set("cache_dir", Path(self.cache_dir) if self.cache_dir is not None else None)
        keys = self.trusted_keys
        if keys is not None and not Path(keys).is_dir():
            raise InputError(f"SOPPU_TRUSTED_KEYS={str(keys)!r} is not a directory; point it at a dir of pinned "
                             "owner keys <owner>.pub or <owner>/*.pub, or unset it to trust the registry's keys")
        self._set("trusted_keys", Path(keys) if keys is not None else None)
        form = str(self.serve_format).strip().lower()
        if form not in FORMS:
            raise InputError(f"SOPPU_SERVE_FORMAT={form!r} is not a serving form; use one of {', '.join(FORMS)}")
        self._set("serve_format", form)
        retries = _number(self.registry_retries, int)
        if retries is None or retries < 0:
            raise InputError(f"SOPPU_REGISTRY_RETRIES={self.registry_retries!r} must be an integer >= 0")
        self._set("registry_retries", retries)
        cap = _number(self.max_json_bytes, int)
        if cap is None or cap < 1024:
            raise InputError(f"SOPPU_REGISTRY_MAX_JSON_BYTES={self.max_json_bytes!r} must be an integer number of "
                             f"bytes >= 1024 (default {MAX_JSON_BYTES})")
        self._set("max_json_bytes", cap)
        rank = _number(self.max_served_rank, int)
        if rank is None or rank < 1:
            raise InputError(f"SOPPU_MAX_SERVED_RANK={self.max_served_rank!r} must be an integer >= 1 "
                             f"(default {MAX_SERVED_RANK})")
        self._set("max_served_rank", rank)
        for name, positive in (("registry_timeout", True), ("download_deadline", True), ("resolve_ttl", False)):
            raw = getattr(self, name)
            value = _number(raw, float)
            if value is None or value < 0 or (positive and value == 0):
                raise InputError(f"{_ENV[name]}={raw!r} must be a number of seconds {'> 0' if positive else '>= 0'}")
            self._set(name, value)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ normalizes

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``SOPPU_*`` variable of ``environ`` (default ``os.environ``) once; an unset or
        empty one keeps its default. Keyword ``overrides`` that are not None (a source's explicit
        ``cache_dir``, say) win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {f.name: env.get(_ENV[f.name], "").strip() for f in fields(cls)}
        values = {k: v for k, v in values.items() if v}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def require_registry_url(self, fix: str = "set SOPPU_REGISTRY_URL=http://registry:8080") -> str:
        """The registry URL, or an InputError saying how to set it (``fix``: the engine's words,
        :attr:`soppu_serving.wording.Wording.url_fix`)."""
        if not self.registry_url:
            raise InputError(f"SOPPU_REGISTRY_URL is not set: {fix}")
        return self.registry_url

    def client_options(self) -> dict[str, Any]:
        """The :class:`~soppu_client.registry_client.RegistryClient` keywords these settings set."""
        return {"retries": self.registry_retries, "timeout": self.registry_timeout,
                "max_json_bytes": self.max_json_bytes, "download_deadline": self.download_deadline}

    @property
    def cache_root(self) -> Path:
        """``cache_dir``, or ``<HUGGINGFACE_HUB_CACHE>/soppu`` (LoRAX's cache) when it is not set."""
        if self.cache_dir is not None:
            return self.cache_dir
        try:
            from huggingface_hub.constants import HUGGINGFACE_HUB_CACHE

            hub = HUGGINGFACE_HUB_CACHE
        except ImportError:  # pragma: no cover - huggingface_hub is a LoRAX and transformers dependency
            hub = os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(
                os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
        return Path(hub) / "soppu"


def warn_if_unpinned(settings: Settings) -> bool:
    """Log a warning, once per process and registry, when ``settings`` trusts the keys the registry
    supplies (no ``SOPPU_TRUSTED_KEYS``): a compromised registry could then substitute its own key
    for an owner's. Returns whether it warned now."""
    if settings.trusted_keys is not None:
        return False
    url = settings.registry_url or "(SOPPU_REGISTRY_URL unset)"
    with _warn_lock:
        if url in _warned:
            return False
        _warned.add(url)
    log.warning("soppu source: SOPPU_TRUSTED_KEYS is not set, so adapters from the registry at %s are verified "
                "with the keys that registry supplies, trusted on first use (a later key only through a rotation "
                "proof); a compromised registry could substitute its own key for an owner this host has not seen "
                "yet. Pin the owners' public keys: SOPPU_TRUSTED_KEYS=<dir> holding <owner>.pub or "
                "<owner>/*.pub (the recommended mode)", url)
    return True


def _number(value: Any, kind: type) -> int | float | None:
    """``value`` (a number, or a variable's text) as ``kind``; None when it is not one (or NaN)."""
    if isinstance(value, bool):
        return None
    try:
        number = kind(value) if isinstance(value, str) else value
    except ValueError:
        return None
    if kind is int and not isinstance(number, int):
        return None
    if not isinstance(number, (int, float)) or number != number:
        return None
    result: int | float = kind(number)
    return result
