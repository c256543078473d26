"""LoRAX adapter source ``soppu``: adapters from a SOPPU registry, as PEFT dirs or compressed dirs.

A patched LoRAX (see ``server_patches/``) routes ``adapter_source="soppu"`` here:
``get_model_source`` builds a :class:`SoppuModelSource`, ``get_config_path`` / ``get_local_dir``
call :func:`get_soppu_local_dir`. The adapter id is ``owner/name[@version]``.

Settings come from the LoRAX process's ``SOPPU_*`` environment variables, read once per source
by :class:`soppu_serving.settings.Settings` (which lists and documents them all): at least
``SOPPU_REGISTRY_URL``; ``SOPPU_SERVE_FORMAT=compressed`` serves the compressed form to a LoRAX
with patches 0005-0008 (each cluster's basis resident once, only cores per adapter).

One source is one LoRAX request for one adapter: its first call that needs the adapter serves it
through the process's one :class:`soppu_serving.Session` (LoRAX wording) with the request's
token -- resolve, verify once (key, signature, expiry against the clock, rollback), materialize --
and every later call of that source (``weight_files``, ``download_model_assets``, ``load_config``,
``provenance``) reuses that result, re-checking only the expiry against the clock. A new request
(a new source) resolves and verifies again, so a cached adapter is still only served to a caller
the registry lets read it. A source trusting the registry's keys (no ``SOPPU_TRUSTED_KEYS``:
trust on first use) logs a warning once per process. Errors are
:class:`~soppu_client.format.errors.SoppuError` subclasses whose message names the adapter and the
fix; LoRAX returns that message to the client.

This module imports nothing from LoRAX at import time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

from soppu_serving import LORAX, AdapterRef, FetchStats, Served, Settings, shared_session
from soppu_serving.cache import LATEST, MARKER, Cache

if TYPE_CHECKING:  # pragma: no cover
    from lorax_server.adapters.config import AdapterConfig

__all__ = ["SoppuModelSource", "get_soppu_local_dir", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def get_soppu_local_dir(model_id: str) -> Path:
    """Where LoRAX finds the materialized dir of ``model_id`` (no network).

    ``owner/name@N`` -> ``<cache>/owner/name/vN``; ``owner/name`` -> ``<cache>/owner/name/v<N>``
    for the N that ``latest`` names (the link is read, never followed; without one, the ``latest``
    path itself, which does not exist).
    """
    ref = AdapterRef.parse(model_id)
    settings = Settings.from_env()  # the root and form the source uses
    cache = Cache(settings.cache_root, settings.serve_format)
    version = ref.version if ref.version is not None else cache.latest_version(ref.owner, ref.name)
    if version is not None:
        return cache.version_dir(ref.owner, ref.name, version)
    return cache.adapter_root(ref.owner, ref.name) / LATEST


class SoppuModelSource:
    """LoRAX ``BaseModelSource`` for one ``owner/name[@version]`` adapter (duck-typed: no LoRAX import)."""

    def __init__(self, model_id: str, revision: Optional[str] = None, extension: str = ".safetensors",
                 api_token: Optional[str] = None, *, cache_dir: str | os.PathLike[str] | None = None,
                 registry: str | None = None, form: str | None = None):
        self.model_id = model_id
        self.ref = AdapterRef.parse(model_id, revision)
        self.revision = revision
        self.extension = extension
        # The environment, read once; explicit arguments win over it. One session per settings and process.
        self.settings = Settings.from_env(cache_dir=cache_dir, registry_url=registry, serve_format=form)
        self.session = shared_session(self.settings, LORAX)
        self._api_token = api_token or self.settings.registry_token
        self.cache = self.session.cache
        self._served: Served | None = None  # this request's one verified resolution
        self.last_stats: FetchStats | None = None

    # -- LoRAX interface ----------------------------------------------------------------------
    @property
    def api_token(self) -> Optional[str]:
        return self._api_token

    @property
    def registry_url(self) -> str:
        return self.settings.require_registry_url(LORAX.url_fix)

    def remote_weight_files(self, extension: str = None) -> List[str]:
        extension = extension or self.extension
        return [f for f in self.cache.weight_names if f.endswith(extension)]

    def weight_files(self, extension: str = None) -> List[Path]:
        """The cached weight files of the resolved version; FileNotFoundError when not materialized
        (or not yet proven intact by this process: ``download_model_assets`` then does it).

        For ``owner/name`` (no version) the registry is asked for the latest version (with the
        request's token), so a newly published version is fetched rather than a stale one served.
        """
        names = self.remote_weight_files(extension)
        if not names:
            raise FileNotFoundError(f"soppu adapter {self.ref} has no weights with extension "
                                    f"{extension or self.extension}")
        served = self._current()
        if served is None:
            served = self.session.cached(self.ref, self.api_token)
            if served is None:
                local = self.cache.version_dir(self.ref.owner, self.ref.name, self.ref.version) \
                    if self.ref.version is not None else self.cache.adapter_root(self.ref.owner, self.ref.name)
                raise FileNotFoundError(f"soppu adapter {self.ref} is not in the local cache ({local}); "
                                        "it is fetched by download_model_assets()")
            self._remember(served)
        return [served.path / name for name in names]

    def download_weights(self, filenames: List[str]) -> List[Path]:
        local = self._materialize()
        return [local / f for f in filenames]

    def download_model_assets(self) -> List[Path]:
        local = self._materialize()
        return [local / name for name in sorted(self.cache.file_names)]

    def download_file(self, filename: str, ignore_errors: bool = False) -> Optional[Path]:
        """Materialize the adapter (if needed) and return one of its files.

        Registry, signature and digest errors always raise (they must reach the client);
        ``ignore_errors`` only covers a file the adapter does not have (e.g. ``config.json``).
        """
        local = self._materialize()
        if filename in self.cache.file_names:
            return local / filename
        if ignore_errors:
            return None
        raise FileNotFoundError(f"soppu adapter {self.ref} has no file {filename!r}")

    def get_local_path(self, model_id: str) -> Path:
        return get_soppu_local_dir(model_id)

    def get_weight_bytes(self) -> int:
        """Bytes of tensor data in the weight files (what LoRAX reserves memory for)."""
        total = 0
        for path in self.weight_files():
            size = path.stat().st_size
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + header_len > size:
                raise RuntimeError(f"soppu adapter {self.ref}: {path} is not a safetensors file")
            total += size - 8 - header_len
        return total

    def load_config(self) -> "AdapterConfig":
        """As LoRAX's ``BaseModelSource.load_config``: config.json / adapter_config.json -> AdapterConfig."""
        from lorax_server.adapters import load_adapter_config

        config_path = self.download_file("config.json", ignore_errors=True)
        adapter_config_path = self.download_file(CONFIG_NAME, ignore_errors=True)
        return load_adapter_config(config_path, adapter_config_path, self.api_token)

    # -- SOPPU specifics ----------------------------------------------------------------------
    def _current(self) -> Served | None:
        """This request's served adapter, its expiry checked against the clock again."""
        if self._served is not None:
            self._served.check_expiry()
        return self._served

    def _remember(self, served: Served) -> None:
        self._served = served
        self.last_stats = served.stats

    def _materialize(self) -> Path:
        served = self._current()
        if served is None:
            served = self.session.serve(self.ref, self.api_token)
            self._remember(served)
        return served.path

    def local_dir(self) -> Path:
        """The version dir this request serves (materialized and verified once per source)."""
        return self._materialize()

    def provenance(self) -> dict[str, Any]:
        """soppu_source.json of the materialized version (registry, key id, statement digest, files)."""
        return json.loads(self.cache.read_text(self._materialize() / MARKER))
