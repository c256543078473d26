"""Low-bit storage of bundle tensors: the grid, bit packing, scales, dequantization.

A quantized tensor X (logical shape ``shape``) is stored as two safetensors entries::

    "<name>.q"      U8  [ceil(rows * cols * bits / 8)]   codes c in [0, 2^bits), bit-packed
    "<name>.scale"  F16 [ceil(rows / group_size), cols]  one scale per group, > 0

where X is viewed as a 2-D matrix [rows, cols]: bases U [d_out, k] / V [d_in, k] as they are
(groups of ``group_size`` consecutive entries down each basis column), cores flattened to
[k*k, 1] ([k, 1] for diag cores; groups over the whole core). Value of entry (r, j):

    X[r, j] = scale[r // group_size, j] * (c[r, j] - 2^(bits-1))      levels -2^(b-1) .. 2^(b-1)-1

(zero is a level, so zero groups and zero padding are exact). Codes are packed row-major over the
[rows, cols] view, each code's bits least-significant first, into a little-endian bit stream.
Dequantization happens once, when a bundle is read (``Bundle.bases`` / ``Bundle.load_cores``);
everything downstream (PEFT export, compressed form, kernels) sees float tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

QUANT_BITS = (2, 3, 4, 8)
"""Bit widths a bundle may store."""
SCALE_DTYPE = "F16"
"""Safetensors dtype of every scale tensor."""
ROLES = ("basis", "cores")
"""Quantization specs are per module and role: ``basis`` (every cluster's U and V), ``cores`` (every S)."""


def quant_keys(name: str) -> tuple[str, str]:
    """Tensor names of the packed codes and scales of the quantized tensor ``name``."""
    return f"{name}.q", f"{name}.scale"


def matrix_view(shape: tuple[int, ...], role: str) -> tuple[int, int]:
    """[rows, cols] a tensor of ``shape`` is grouped as: bases as they are, cores flattened to one column."""
    if role == "basis":
        return int(shape[0]), int(shape[1])
    return int(math.prod(shape)), 1


@dataclass(frozen=True)
class QuantSpec:
    """How one role of one module is stored: ``bits`` per code, ``group_size`` entries per scale."""

    bits: int
    group_size: int = 64

    @property
    def zero(self) -> int:
        return 1 << (self.bits - 1)

    def packed_len(self, rows: int, cols: int) -> int:
        return (rows * cols * self.bits + 7) // 8

    def scale_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return (-(-rows // self.group_size), cols)

    def stored_bytes(self, rows: int, cols: int) -> int:
        """Bytes of codes plus fp16 scales of a [rows, cols] view."""
        g, c = self.scale_shape(rows, cols)
        return self.packed_len(rows, cols) + 2 * g * c

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def parse(cls, data: object, where: str, p: list[str]) -> QuantSpec | None:
        """Parse a manifest spec; problems are appended to ``p`` (naming ``where``), None if bad."""
        if not isinstance(data, dict) or set(data) != {"bits", "group_size"}:
            p.append(f"{where}: quantization needs exactly `bits` and `group_size`, not {data!r}")
            return None
        bits, group = data.get("bits"), data.get("group_size")
        ok = True
        if type(bits) is not int or bits not in QUANT_BITS:
            p.append(f"{where}: `bits` {bits!r} is not one of {', '.join(map(str, QUANT_BITS))}")
            ok = False
        if type(group) is not int or not 1 <= group <= 1 << 20:
            p.append(f"{where}: `group_size` {group!r} is not a positive integer (at most 1048576)")
            ok = False
        return cls(cast(int, bits), cast(int, group)) if ok else None


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit-pack integer codes (any shape, values in [0, 2^bits)) row-major into uint8 [ceil(n*bits/8)]."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"codes exceed {bits} bits")
    bitplanes = ((flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)  # [n, bits]
    return np.packbits(bitplanes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 codes [n]."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8).reshape(-1), bitorder="little", count=n * bits)
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (stream.reshape(n, bits).astype(np.uint16) @ weights).astype(np.uint8)


def expand_scales(scale: np.ndarray, rows: int, group_size: int) -> np.ndarray:
    """Per-entry scales [rows, cols] from per-group scales [groups, cols] (tail group shorter)."""
    return np.repeat(np.asarray(scale, dtype=np.float32), group_size, axis=0)[:rows]


def dequantize(packed: np.ndarray, scale: np.ndarray, spec: QuantSpec, shape: tuple[int, ...], role: str) -> np.ndarray:
    """Float32 values of a stored quantized tensor, in its logical ``shape``."""
    rows, cols = matrix_view(shape, role)
    codes = unpack_codes(packed, spec.bits, rows * cols).reshape(rows, cols).astype(np.float32)
    values = expand_scales(scale, rows, spec.group_size) * (codes - spec.zero)
    return values.reshape(shape)


def scale_problem(scale: np.ndarray) -> str | None:
    """Why a scale tensor is unusable (non-finite, zero or negative entries), or None."""
    s = np.asarray(scale, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        return "has NaN or Inf entries"
    if np.any(s <= 0):
        return f"has {int(np.sum(s <= 0))} zero or negative entries (scales must be > 0)"
    return None


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor ready to store: packed codes (uint8), per-group scales (float16 [groups,
    cols]), its spec and logical shape. ``role`` picks the [rows, cols] view (see module doc)."""

    packed: np.ndarray
    scale: np.ndarray
    spec: QuantSpec
    shape: tuple[int, ...]
    role: str

    def dequantize(self) -> np.ndarray:
        return dequantize(self.packed, self.scale, self.spec, self.shape, self.role)
