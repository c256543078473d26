"""validate_safetensors: every structural and value check, exact messages, and a bounded fuzz
against the safetensors library itself (the independent reference)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save, save_file

from soppu_client.format.errors import SafetensorsFormatError
from soppu_client.format.safetensors_check import validate_safetensors


def raw_file(header: dict | bytes, data: bytes = b"") -> bytes:
    """Assemble a safetensors file from a header (dict or raw JSON bytes) and a data section."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def f32(name: str = "a", shape: list[int] | None = None, start: int = 0) -> dict:
    shape = [2] if shape is None else shape
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": [start, start + 4 * int(np.prod(shape))]}}


def reference(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """What the safetensors library reads (reads every tensor too)."""
    with safe_open(str(path), framework="pt") as f:
        out = {}
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
            f.get_tensor(k)
        return out


def error(data: bytes, **kw) -> str:
    with pytest.raises(SafetensorsFormatError) as exc:
        validate_safetensors(data, **kw)
    return str(exc.value)


# --------------------------------------------------------------------------- valid files


def test_valid_file_matches_safetensors_library(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.arange(5, dtype=np.int8),
               "h": np.ones((2, 1), np.float16), "z": np.zeros((0, 3), np.float64),
               "m": np.array([True, False])}
    save_file(tensors, str(path), metadata={"format": "pt"})
    got = validate_safetensors(path)
    assert got == reference(path)
    assert got["w"] == ("F32", (3, 4)) and got["z"] == ("F64", (0, 3))
    assert validate_safetensors(path.read_bytes()) == got


def test_bf16_and_fp8_files_pass_when_finite(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_pt

    path = tmp_path / "bf.safetensors"
    save_pt({"b": torch.randn(4, 3).to(torch.bfloat16), "e": torch.randn(5).to(torch.float8_e4m3fn),
             "f": torch.randn(5).to(torch.float8_e5m2)}, str(path))
    assert validate_safetensors(path) == reference(path)


def test_expected_shapes_accepted() -> None:
    data = save({"m.S": np.zeros((2, 2), np.float32)})
    assert validate_safetensors(data, expected={"m.S": ("F32", (2, 2))}) == {"m.S": ("F32", (2, 2))}
    assert validate_safetensors(data, expected={"m.S": (None, (2, 2))}) == {"m.S": ("F32", (2, 2))}


# --------------------------------------------------------------------------- structure


def test_file_shorter_than_8_bytes() -> None:
    assert error(b"\x01\x00") == ("<bytes>: file is 2 bytes, shorter than the 8-byte header length; "
                                  "the file is truncated or not a safetensors file")


def test_header_length_cap_and_past_end() -> None:
    data = raw_file(f32(), b"\0" * 8)
    assert "exceeds the cap of 16 bytes" in error(data, max_header_bytes=16)
    huge = struct.pack("<Q", 2**63) + data[8:]
    assert "exceeds the cap" in error(huge)
    past = struct.pack("<Q", len(data)) + data[8:]
    assert "runs past the end of the" in error(past)


def test_header_not_utf8_or_not_json_or_not_object() -> None:
    assert "header is not valid UTF-8 (byte 1)" in error(raw_file(b'{\xff}'))
    assert "header is not valid JSON" in error(raw_file(b'{"a": '))
    assert "header is not valid JSON" in error(raw_file(b'{"a": NaN}'))
    assert error(raw_file(b"[1, 2]")) == "<bytes>: header must be a JSON object, got array"


def test_duplicate_keys_rejected_though_safetensors_accepts_them(tmp_path: Path) -> None:
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    data = raw_file(b'{"a":' + entry + b',"a":' + entry + b"}", b"\0" * 4)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(data)
    assert reference(path) == {"a": ("F32", (1,))}  # non-vacuity: the library is silent about it
    assert error(data) == ("<bytes>: duplicate key `a` in header; the safetensors library would "
                           "silently keep only the last one, so the file is refused")


@pytest.mark.parametrize("meta", [None, {"k": 1}, ["x"], {"k": None}])
def test_metadata_must_map_str_to_str(meta: object) -> None:
    msg = error(raw_file({"__metadata__": meta, **f32()}, b"\0" * 8))
    assert msg.startswith("<bytes>: `__metadata__`") and "string to a string" in msg or \
        "mapping strings to strings" in msg
    assert validate_safetensors(raw_file({"__metadata__": {"k": "v"}, **f32()}, b"\0" * 8))


def test_tensor_entry_fields() -> None:
    extra = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}
    assert error(raw_file(extra, b"\0" * 4)) == (
        "<bytes>: tensor `a`: entry must have exactly dtype, shape, data_offsets "
        "(missing [], unexpected ['x'])")
    assert "entry must be an object" in error(raw_file({"a": [1]}))
    unknown = {"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}
    assert error(raw_file(unknown, b"\0" * 4)).startswith("<bytes>: tensor `a`: unknown dtype 'F33'")
    for shape in ([True], [1.0], [-1], "2"):
        bad = {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
        assert "shape must be a list of non-negative integers" in error(raw_file(bad, b"\0" * 4))
    bad_off = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}
    assert "data_offsets must be [start, end]" in error(raw_file(bad_off, b"\0" * 4))


def test_gap_overlap_span_trailing_and_beyond_file() -> None:
    gap = {**f32("a"), **f32("b", start=12)}
    assert error(raw_file(gap, b"\0" * 20)) == (
        "<bytes>: tensor `b`: gap: data starts at byte 12 but the previous tensor ends at byte 8")
    overlap = {**f32("a"), **f32("b", start=4)}
    assert "tensor `b`: overlap: data starts at byte 4" in error(raw_file(overlap, b"\0" * 12))
    span = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    assert error(raw_file(span, b"\0" * 8)) == (
        "<bytes>: tensor `a`: span of 8 bytes does not match shape [3] x F32 (12 bytes)")
    assert error(raw_file(f32(), b"\0" * 9)) == (
        "<bytes>: 1 trailing bytes after the last tensor (data section is 9 bytes, tensors cover 8)")
    assert "beyond the 4-byte data section" in error(raw_file(f32(), b"\0" * 4))
    backwards = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}
    assert "end before they start" in error(raw_file(backwards, b"\0" * 4))


def test_expected_mismatches_are_collected() -> None:
    data = save({"m.S": np.zeros((2, 2), np.float32), "extra": np.zeros(1, np.float32)})
    msg = error(data, expected={"m.S": ("F16", (3, 3)), "n.S": ("F32", (2, 2))}, name="cores/a.safetensors")
    assert msg == ("cores/a.safetensors: does not match the manifest: missing tensor `n.S`; "
                   "unexpected tensor `extra`; tensor `m.S` has dtype F32, expected F16; "
                   "tensor `m.S` has shape [2, 2], expected [3, 3]")


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_non_finite_floats(value: float, dtype: type) -> None:
    arr = np.array([1.0, value, 2.0], dtype=dtype)
    data = save({"w": arr})
    assert error(data) == ("<bytes>: tensor `w`: contains NaN or Inf values; the adapter or bundle "
                           "is corrupt (re-run the fit or re-export the file)")
    assert validate_safetensors(data, check_values=False)["w"][1] == (3,)


@pytest.mark.parametrize("bits", [0x7FC0, 0x7F80, 0xFF80, 0xFFC1])
def test_non_finite_bf16_via_bit_pattern(bits: int) -> None:
    words = np.array([0x3F80, bits], dtype="<u2")  # 1.0, then NaN/Inf
    header = {"b": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}
    assert "contains NaN or Inf" in error(raw_file(header, words.tobytes()))
    finite = np.array([0x3F80, 0x7F7F], dtype="<u2")  # 1.0 and the largest finite bf16
    assert validate_safetensors(raw_file(header, finite.tobytes())) == {"b": ("BF16", (2,))}


def test_fp8_nan_and_bool_values() -> None:
    e4 = {"e": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}
    assert "NaN or Inf" in error(raw_file(e4, bytes([0x38, 0x7F])))
    assert validate_safetensors(raw_file(e4, bytes([0x38, 0x7E])))  # 448, finite
    b = {"m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}
    assert "BOOL tensor holds bytes other than 0 and 1" in error(raw_file(b, bytes([1, 2])))


def test_missing_path_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsFormatError, match="cannot open safetensors file"):
        validate_safetensors(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------- fuzz


def _seed_file() -> bytes:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save as save_pt

    g = torch.Generator().manual_seed(0)
    return save_pt({"a.U": torch.randn(3, 2, generator=g), "a.V": torch.randn(2, 2, generator=g).to(torch.bfloat16),
                    "c.S": torch.arange(6, dtype=torch.int8).reshape(2, 3),
                    "h": torch.randn(3, generator=g).to(torch.float16)},
                   metadata={"format": "pt"})


SEED = None


def _consistent(data: bytes, path: Path) -> None:
    """The validator raises SafetensorsFormatError or agrees with safe_open; nothing else."""
    path.write_bytes(data)
    try:
        got = validate_safetensors(data)
    except SafetensorsFormatError:
        with pytest.raises(SafetensorsFormatError):
            validate_safetensors(path)  # the file path gives the same verdict
        return
    assert validate_safetensors(path) == got
    assert reference(path) == got


@settings(max_examples=150, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutations_and_truncations(tmp_path: Path, data: st.DataObject) -> None:
    global SEED
    SEED = SEED or _seed_file()
    buf = bytearray(SEED)
    n = data.draw(st.integers(1, 3), label="mutations")
    for _ in range(n):
        kind = data.draw(st.sampled_from(["flip", "set", "set", "truncate"]))
        if kind == "truncate":
            del buf[data.draw(st.integers(0, max(len(buf) - 1, 0))):]
        elif len(buf) > 8:
            header_end = min(len(buf), 8 + struct.unpack("<Q", bytes(SEED[:8]))[0])
            # mostly inside the JSON header, where the structure lives
            where = data.draw(st.sampled_from(["header", "header", "anywhere"]))
            lo, hi = (8, header_end - 1) if where == "header" and header_end > 8 else (0, len(buf) - 1)
            i = data.draw(st.integers(lo, hi))
            buf[i] = buf[i] ^ data.draw(st.integers(1, 255)) if kind == "flip" else \
                data.draw(st.sampled_from(list(b'0123456789{}[]",:ABFIU_ ')))
    _consistent(bytes(buf), tmp_path / "fuzz.safetensors")


def test_fuzz_seed_is_valid_and_consistent(tmp_path: Path) -> None:
    """Non-vacuity for the fuzz: the unmutated seed passes and agrees with the library."""
    _consistent(_seed_file(), tmp_path / "seed.safetensors")
    assert len(validate_safetensors(_seed_file())) == 4
