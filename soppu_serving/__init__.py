"""Engine-neutral serving side. The one way in for an engine is a :class:`Session` (made once per
process from :class:`Settings`): ``session.serve(ref, token, check=...) -> Served(path, form,
verified, stats)`` resolves, verifies once (owner key pinned or trusted on first use, signature,
expiry, rollback), runs the engine's check and materializes the adapter (PEFT or compressed dir)
in a cache that follows no symlinks and proves its files before handing them over. Also: the cache
layout (:class:`Cache`), ``soppu-cache prune``. Engine glue (``lorax_adapter_source``,
``vllm_lora_resolver``) builds on this; nothing here imports an engine."""

from __future__ import annotations

from soppu_client.fetch import VerifiedVersion, VersionRecord
from soppu_client.format.refs import AdapterRef

from soppu_serving.cache import Cache, CacheError
from soppu_serving.materialize import FetchStats
from soppu_serving.prune import prune_cache
from soppu_serving.session import EngineCheck, Served, Session, forget_sessions, shared_session
from soppu_serving.settings import Settings
from soppu_serving.wording import GENERIC, LORAX, VLLM, Wording

__all__ = ["AdapterRef", "Cache", "CacheError", "EngineCheck", "FetchStats", "GENERIC", "LORAX", "Served", "Session",
           "Settings", "VLLM", "VerifiedVersion", "VersionRecord", "Wording", "forget_sessions", "prune_cache",
           "shared_session"]
