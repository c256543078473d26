"""Exact byte size of a safetensors file from its entries, without writing it.

A safetensors file is ``u64 header length`` (8 bytes, little endian) + the JSON header + the
tensor data. The ``safetensors`` library (0.4-0.8, the Rust serializer ``torch.save_file`` and
``numpy.save`` share) writes the header compactly (no spaces), ``__metadata__`` first, then the
tensors sorted by dtype (descending in its ``Dtype`` enum order) and then by name, each as
``"<name>":{"dtype":"<D>","shape":[...],"data_offsets":[begin,end]}`` with offsets in that order,
and pads the header with spaces to a multiple of 8. :func:`safetensors_file_bytes` reproduces
that, so ``soppu compress --budget`` can count headers exactly before anything is written; a test
compares it with files the library writes.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

__all__ = ["DTYPE_BYTES", "entry_bytes", "header_bytes", "safetensors_file_bytes"]

DTYPE_BYTES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                               "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                               "F64": 8, "I64": 8, "U64": 8}
"""Bytes per element of the whole-byte dtypes."""

# the safetensors ``Dtype`` enum order (the serializer sorts tensors by it, descending)
_DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
                "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
_RANK = {d: i for i, d in enumerate(_DTYPE_ORDER)}

Entries = Mapping[str, tuple[str, tuple[int, ...]]]
"""Tensor name -> (safetensors dtype, shape)."""


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPE_BYTES[dtype] * math.prod(shape)


def entry_bytes(name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> int:
    """Header bytes of one tensor entry, its separating comma included."""
    text = _dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}})
    return len(text.encode()) - 2 + 1  # without the enclosing braces, with a comma


def header_bytes(entries: Entries, metadata: Mapping[str, str] | None = None) -> int:
    """Bytes before the tensor data: the 8-byte length plus the JSON header padded to a multiple of 8."""
    parts: list[str] = []
    if metadata:
        parts.append(_dumps({"__metadata__": dict(metadata)})[1:-1])
    offset = 0
    for name in sorted(entries, key=lambda n: (-_RANK[entries[n][0]], n.encode())):
        dtype, shape = entries[name]
        end = offset + _nbytes(dtype, shape)
        parts.append(_dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}})[1:-1])
        offset = end
    n = len(("{" + ",".join(parts) + "}").encode())
    return 8 + n + (-n) % 8


def safetensors_file_bytes(entries: Entries, metadata: Mapping[str, str] | None = None) -> int:
    """Size in bytes of the safetensors file holding ``entries`` (and ``metadata``)."""
    return header_bytes(entries, metadata) + sum(_nbytes(d, s) for d, s in entries.values())
