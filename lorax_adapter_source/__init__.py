"""LoRAX glue: the adapter source ``soppu`` (:mod:`lorax_adapter_source.source`, over the
engine-neutral ``soppu_serving``) and the compressed adapter type for a patched LoRAX
(:mod:`lorax_adapter_source.compressed`). Imports nothing from LoRAX at import time."""

from __future__ import annotations

from lorax_adapter_source.source import SoppuModelSource, get_soppu_local_dir

__all__ = ["SoppuModelSource", "get_soppu_local_dir"]
