"""SOPPU client: compress, verify, sign and upload collections of PEFT LoRA adapters."""

from __future__ import annotations

__version__ = "0.1.0"
