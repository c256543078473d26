"""Low-bit storage primitives (format/quant.py) and the manifest fields that declare them."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from soppu_client.format.bundle import Manifest
from soppu_client.format.errors import BundleError
from soppu_client.format.quant import QuantSpec, dequantize, pack_codes, unpack_codes


def _bits_by_hand(packed: np.ndarray, bits: int, n: int) -> list[int]:
    """Independent decoder: walk the little-endian bit stream one bit at a time."""
    out = []
    for i in range(n):
        v = 0
        for b in range(bits):
            pos = i * bits + b
            v |= ((int(packed[pos // 8]) >> (pos % 8)) & 1) << b
        out.append(v)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 131])
def test_pack_round_trip_and_layout(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 1 << bits, size=n, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == ((n * bits + 7) // 8,)
    assert _bits_by_hand(packed, bits, n) == codes.tolist()
    np.testing.assert_array_equal(unpack_codes(packed, bits, n), codes)


def test_pack_refuses_codes_wider_than_bits() -> None:
    with pytest.raises(ValueError, match="exceed 3 bits"):
        pack_codes(np.array([8], dtype=np.uint8), 3)


def test_dequantize_matches_a_loop_reference_with_tail_group() -> None:
    rng = np.random.default_rng(0)
    spec = QuantSpec(bits=3, group_size=4)
    rows, cols = 10, 3  # 10 rows in groups of 4: the last group holds 2
    codes = rng.integers(0, 8, size=(rows, cols), dtype=np.uint8)
    scale = rng.uniform(0.1, 2.0, size=spec.scale_shape(rows, cols)).astype(np.float16)
    assert scale.shape == (3, 3)
    got = dequantize(pack_codes(codes, 3), scale, spec, (rows, cols), "basis")
    want = np.empty((rows, cols))
    for r in range(rows):
        for j in range(cols):
            want[r, j] = float(scale[r // 4, j]) * (int(codes[r, j]) - 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # cores are flattened to one column: a [3, 3] core has 9 entries, groups of 4 -> scales [3, 1]
    core = dequantize(pack_codes(codes[:3], 3), scale[:, :1], spec, (3, 3), "cores")
    flat = codes[:3].reshape(-1)
    np.testing.assert_allclose(core.reshape(-1), [float(scale[i // 4, 0]) * (int(flat[i]) - 4) for i in range(9)],
                               atol=1e-6)


def _manifest(**module_extra) -> dict:
    meta = {"shape": [6, 5], **module_extra}
    return {
        "format": "soppu-bundle/1", "base_model": "m", "method": "full", "rank": 4, "dtype": "bfloat16",
        "clusters": 1, "peft": {}, "fit": {}, "modules": {"layers.0.q": meta, "layers.0.v": {"shape": [4, 5]}},
        "adapters": {"a": {"core": "cores/a.safetensors", "cluster": 0}},
        "files": {"basis.safetensors": {"sha256": "0" * 64, "size": 1},
                  "cores/a.safetensors": {"sha256": "1" * 64, "size": 1}},
    }


def test_old_manifest_reads_with_one_k_and_no_quantization() -> None:
    data = _manifest()
    data["rank"] = 3
    m = Manifest.from_json(data)
    assert m.module_rank("layers.0.q") == 3 and m.quant == {}
    assert m.expected_tensors("basis.safetensors")["layers.0.q.U"] == ("BF16", (6, 3))
    assert m.to_json()["modules"]["layers.0.q"] == {"shape": [6, 5]}  # nothing new written for old bundles


def test_expected_tensors_of_quantized_mixed_rank_module() -> None:
    m = Manifest.from_json(_manifest(rank=2, quant={"basis": {"bits": 3, "group_size": 4},
                                                    "cores": {"bits": 4, "group_size": 64}}))
    basis = m.expected_tensors("basis.safetensors")
    assert basis["layers.0.q.U.q"] == ("U8", ((6 * 2 * 3 + 7) // 8,))
    assert basis["layers.0.q.U.scale"] == ("F16", (2, 2))  # 6 rows in groups of 4 -> 2 groups, per column
    assert basis["layers.0.q.V.scale"] == ("F16", (2, 2))
    assert basis["layers.0.v.U"] == ("BF16", (4, 4))  # the other module: float, the bundle's k
    assert "layers.0.q.U" not in basis
    cores = m.expected_tensors("cores/a.safetensors")
    assert cores == {"layers.0.q.S.q": ("U8", (2,)), "layers.0.q.S.scale": ("F16", (1, 1)),
                     "layers.0.v.S": ("BF16", (4, 4))}
    assert Manifest.from_json(m.to_json()) == m  # round trip


def test_every_problem_is_listed_at_once() -> None:
    data = _manifest(rank=9, quant={"basis": {"bits": 5, "group_size": 0}, "cores": {"bits": 4}})
    data["modules"]["layers.0.v"]["quant"] = {"weights": {"bits": 4, "group_size": 8}}
    with pytest.raises(BundleError) as e:
        Manifest.from_json(data, "m.json")
    msg = str(e.value)
    assert "`rank` 9 exceeds min(d_out, d_in) of module `layers.0.q` (6 x 5)" in msg
    assert "module `layers.0.q`: `rank` 9 exceeds the bundle's `rank` 4" in msg
    assert "module `layers.0.q` quant.basis: `bits` 5 is not one of 2, 3, 4, 8" in msg
    assert "module `layers.0.q` quant.basis: `group_size` 0 is not a positive integer" in msg
    assert "module `layers.0.q` quant.cores: quantization needs exactly `bits` and `group_size`" in msg
    assert "module `layers.0.v`: `quant` must be an object with keys among basis, cores" in msg


def test_module_rank_must_be_a_positive_integer() -> None:
    data = copy.deepcopy(_manifest(rank=0))
    with pytest.raises(BundleError, match=r"module `layers.0.q`: `rank` 0 is not a positive integer"):
        Manifest.from_json(data)
