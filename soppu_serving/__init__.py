"""Engine-neutral serving side: resolve -> ``soppu_client.fetch.fetch_verified`` -> materialize
(PEFT or compressed dir) -> cache with locks, prune. Settings come from ``SOPPU_*`` variables
(:class:`Settings`). Engine glue (``lorax_adapter_source``) builds on this; nothing here imports
an engine."""

from __future__ import annotations

from soppu_serving.cache import Cache
from soppu_serving.materialize import FetchStats, forget_resolutions, materialize, resolve
from soppu_serving.prune import prune_cache
from soppu_serving.settings import Settings

__all__ = ["Cache", "FetchStats", "Settings", "forget_resolutions", "materialize", "prune_cache", "resolve"]
