"""SOPPU serving side: the adapter registry service, the LoRAX adapter source `soppu`, and the
compressed adapter type for a patched LoRAX. Imports nothing from LoRAX at import time."""

from __future__ import annotations

from lorax_adapter_source.source import SoppuModelSource, get_soppu_local_dir

__all__ = ["SoppuModelSource", "get_soppu_local_dir"]
