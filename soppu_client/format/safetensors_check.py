"""Strict validation of safetensors files, run before any tensor in them is used.

The ``safetensors`` library is permissive where we must not be: it silently keeps the last of
duplicate tensor keys, accepts a ``__metadata__`` of ``null`` and extra per-tensor fields, and
never looks at values.  :func:`validate_safetensors` checks, in order:

* the file is at least 8 bytes and the little-endian u64 header length fits the file and the cap;
* the header is UTF-8 JSON (no NaN/Infinity literals), an object, with no duplicate keys;
* ``__metadata__`` (if present) maps str -> str;
* every tensor entry has exactly ``dtype``, ``shape``, ``data_offsets``; a known whole-byte dtype;
  non-negative integer dims and offsets;
* offsets are contiguous from 0 (no gap, no overlap), each span equals prod(shape) x dtype size,
  and the data ends exactly at the end of the file (no trailing bytes, nothing beyond it);
* optionally, the tensors match an ``expected`` dict (names, dtypes, shapes);
* optionally (default), float values are finite (bf16 / fp8 checked through integer bit views)
  and BOOL bytes are 0 or 1.

Every problem raises :class:`~soppu_client.format.errors.SafetensorsFormatError` naming the file, the
tensor and the problem.  Anything the validator accepts, ``safetensors.safe_open`` reads with
the same names, dtypes and shapes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

import numpy as np

from soppu_client.format.errors import SafetensorsFormatError

__all__ = ["DTYPE_SIZES", "MAX_HEADER_BYTES", "TensorSpec", "validate_safetensors"]

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Default cap on the JSON header length (the safetensors library uses 100 MB too)."""

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
"""Bytes per element of every dtype we accept (sub-byte F4/F6 types are refused)."""

# dtype -> (unsigned view, mask); (bits & mask) == mask means Inf or NaN.
_NONFINITE_BITS: dict[str, tuple[type[np.unsignedinteger], int]] = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "C64": (np.uint32, 0x7F800000),  # two float32 per element
    "F64": (np.uint64, 0x7FF0000000000000),
    "F8_E5M2": (np.uint8, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F),  # e4m3fn: no Inf; NaN is S.1111.111
    "F8_E8M0": (np.uint8, 0xFF),  # 0xFF is NaN
}
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_MAX_DIM = 2**63 - 1
_CHUNK_BYTES = 16 * 1024 * 1024

ExpectedTensors = Mapping[str, tuple[str | None, tuple[int, ...]]]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's header entry: dtype, shape and byte span relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def validate_safetensors(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    expected: ExpectedTensors | None = None,
    check_values: bool = True,
    max_header_bytes: int = MAX_HEADER_BYTES,
    name: str | None = None,
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors file (a path or its bytes) and return ``{tensor: (dtype, shape)}``.

    ``expected`` maps tensor name -> (dtype or None for any, shape); every missing, extra or
    mismatched tensor is reported in one error.  ``name`` labels the source in messages
    (default: the path, or ``<bytes>``).  Raises SafetensorsFormatError on any problem.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        return _validate_source(_BytesSource(memoryview(path_or_bytes)), label, expected,
                                check_values, max_header_bytes)
    path = Path(path_or_bytes)
    label = name or str(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise SafetensorsFormatError(f"{label}: cannot open safetensors file: {exc.strerror}") from None
    with fh:
        return _validate_source(_FileSource(fh), label, expected, check_values, max_header_bytes)


# --------------------------------------------------------------------------- byte sources


class _BytesSource:
    def __init__(self, buf: memoryview):
        self._buf = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf

    def size(self) -> int:
        return len(self._buf)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._buf[offset:offset + length])


class _FileSource:
    def __init__(self, fh: BinaryIO):
        self._fh = fh

    def size(self) -> int:
        return os.fstat(self._fh.fileno()).st_size

    def read(self, offset: int, length: int) -> bytes:
        self._fh.seek(offset)
        data = self._fh.read(length)
        if len(data) != length:
            raise OSError("short read")
        return data


# --------------------------------------------------------------------------- validation steps


def _fail(label: str, problem: str, tensor: str | None = None) -> SafetensorsFormatError:
    where = f"{label}: tensor `{tensor}`" if tensor is not None else label
    return SafetensorsFormatError(f"{where}: {problem}")


def _validate_source(src: _BytesSource | _FileSource, label: str, expected: ExpectedTensors | None,
                     check_values: bool, max_header_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    file_size = src.size()
    header = _read_header(src, label, file_size, max_header_bytes)
    specs = _parse_entries(header, label)
    data_start = 8 + _header_len(src)
    _check_layout(specs, label, file_size - data_start)
    if expected is not None:
        _check_expected(specs, expected, label)
    if check_values:
        for spec in specs:
            _check_values(src, data_start, spec, label)
    return {s.name: (s.dtype, s.shape) for s in specs}


def _header_len(src: _BytesSource | _FileSource) -> int:
    return int(struct.unpack("<Q", src.read(0, 8))[0])


def _read_header(src: _BytesSource | _FileSource, label: str, file_size: int, cap: int) -> dict:
    if file_size < 8:
        raise _fail(label, f"file is {file_size} bytes, shorter than the 8-byte header length; "
                           "the file is truncated or not a safetensors file")
    n = _header_len(src)
    if n > cap:
        raise _fail(label, f"header length {n} exceeds the cap of {cap} bytes; "
                           "the file is corrupt or not a safetensors file")
    if 8 + n > file_size:
        raise _fail(label, f"header length {n} runs past the end of the {file_size}-byte file; "
                           "the file is truncated or corrupt")
    raw = src.read(8, n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(label, f"header is not valid UTF-8 (byte {exc.start}); the file is corrupt") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as exc:
        raise _fail(label, f"duplicate key `{exc.key}` in header; the safetensors library would "
                           "silently keep only the last one, so the file is refused") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(label, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _fail(label, f"header must be a JSON object, got {_json_type(header)}")
    return header


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constants(token: str) -> object:
    raise ValueError(f"non-standard JSON constant {token}")


def _utf8_clean(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \\ud800-style escapes
        return False
    return True


def _parse_entries(header: dict, label: str) -> list[TensorSpec]:
    specs = []
    for key, entry in header.items():
        if not _utf8_clean(key):
            raise _fail(label, f"header key {key!r} is not valid Unicode (lone surrogate escape)")
        if key == "__metadata__":
            _check_metadata(entry, label)
        else:
            specs.append(_parse_tensor(key, entry, label))
    specs.sort(key=lambda s: (s.start, s.end))
    return specs


def _check_metadata(entry: object, label: str) -> None:
    if not isinstance(entry, dict):
        raise _fail(label, f"`__metadata__` must be an object mapping strings to strings, "
                           f"got {_json_type(entry)}")
    for k, v in entry.items():
        if not isinstance(v, str) or not _utf8_clean(k) or not _utf8_clean(v):
            raise _fail(label, f"`__metadata__` entry `{k}` must map a string to a string, "
                               f"got {_json_type(v)}")


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= _MAX_DIM


def _parse_tensor(key: str, entry: object, label: str) -> TensorSpec:
    if not isinstance(entry, dict):
        raise _fail(label, f"entry must be an object, got {_json_type(entry)}", key)
    fields = set(entry)
    if fields != _TENSOR_FIELDS:
        missing = sorted(_TENSOR_FIELDS - fields)
        extra = sorted(fields - _TENSOR_FIELDS)
        raise _fail(label, f"entry must have exactly dtype, shape, data_offsets "
                           f"(missing {missing}, unexpected {extra})", key)
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _fail(label, f"unknown dtype {dtype!r}; supported: {', '.join(DTYPE_SIZES)}", key)
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _fail(label, f"shape must be a list of non-negative integers, got {shape!r}", key)
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _fail(label, f"data_offsets must be [start, end] non-negative integers, got {offsets!r}", key)
    return TensorSpec(key, dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(specs: list[TensorSpec], label: str, data_size: int) -> None:
    pos = 0
    for spec in specs:
        if spec.end < spec.start:
            raise _fail(label, f"data_offsets [{spec.start}, {spec.end}] end before they start", spec.name)
        if spec.start > pos:
            raise _fail(label, f"gap: data starts at byte {spec.start} but the previous tensor "
                               f"ends at byte {pos}", spec.name)
        if spec.start < pos:
            raise _fail(label, f"overlap: data starts at byte {spec.start} inside the previous "
                               f"tensor, which ends at byte {pos}", spec.name)
        span = spec.end - spec.start
        want = math.prod(spec.shape) * DTYPE_SIZES[spec.dtype]
        if span != want:
            raise _fail(label, f"span of {span} bytes does not match shape {list(spec.shape)} x "
                               f"{spec.dtype} ({want} bytes)", spec.name)
        if spec.end > data_size:
            raise _fail(label, f"data_offsets end at byte {spec.end}, beyond the {data_size}-byte "
                               "data section; the file is truncated", spec.name)
        pos = spec.end
    if pos != data_size:
        raise _fail(label, f"{data_size - pos} trailing bytes after the last tensor "
                           f"(data section is {data_size} bytes, tensors cover {pos})")


def _check_expected(specs: list[TensorSpec], expected: ExpectedTensors, label: str) -> None:
    got = {s.name: s for s in specs}
    problems = [f"missing tensor `{n}`" for n in sorted(set(expected) - set(got))]
    problems += [f"unexpected tensor `{n}`" for n in sorted(set(got) - set(expected))]
    for n in sorted(set(expected) & set(got)):
        dtype, shape = expected[n]
        if dtype is not None and got[n].dtype != dtype:
            problems.append(f"tensor `{n}` has dtype {got[n].dtype}, expected {dtype}")
        if tuple(shape) != got[n].shape:
            problems.append(f"tensor `{n}` has shape {list(got[n].shape)}, expected {list(shape)}")
    if problems:
        raise _fail(label, "does not match the manifest: " + "; ".join(problems))


def _chunks(src: _BytesSource | _FileSource, offset: int, length: int, item: int) -> Iterator[bytes]:
    step = max(item, _CHUNK_BYTES - _CHUNK_BYTES % item)
    for pos in range(0, length, step):
        yield src.read(offset + pos, min(step, length - pos))


def _check_values(src: _BytesSource | _FileSource, data_start: int, spec: TensorSpec, label: str) -> None:
    if spec.dtype == "BOOL":
        for chunk in _chunks(src, data_start + spec.start, spec.end - spec.start, 1):
            if np.any(np.frombuffer(chunk, np.uint8) > 1):
                raise _fail(label, "BOOL tensor holds bytes other than 0 and 1", spec.name)
        return
    bits = _NONFINITE_BITS.get(spec.dtype)
    if bits is None:
        return
    view, mask = bits
    item = np.dtype(view).itemsize
    for chunk in _chunks(src, data_start + spec.start, spec.end - spec.start, item):
        words = np.frombuffer(chunk, dtype=np.dtype(view).newbyteorder("<"))
        if np.any((words & view(mask)) == view(mask)):
            raise _fail(label, "contains NaN or Inf values; the adapter or bundle is corrupt "
                               "(re-run the fit or re-export the file)", spec.name)
