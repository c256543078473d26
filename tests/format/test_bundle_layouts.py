"""Core-file layouts: a bundle written by the writer before packed cores (golden, commit 78945c7,
``data/bundle_per_module``) still reads; the same cores packed read the same; both pass the checks
the registry runs; the header of a packed core file is a handful of entries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from soppu_client.format.bundle import Bundle, Manifest, check_scales, export_peft, scale_tensor_names
from soppu_client.format.errors import BundleError
from soppu_client.format.safetensors_check import validate_safetensors
from soppu_registry.checks import header_cap
from tests.client.bundle_files import read_cores, relayout

GOLDEN = Path(__file__).parent / "data" / "bundle_per_module"
QMOD = "model.layers.0.self_attn.v_proj"  # the golden's module with 4-bit cores


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layouts")
    old = root / "old"
    shutil.copytree(GOLDEN, old)
    return old, relayout(old, root / "packed", "packed")


def test_golden_is_the_per_module_layout() -> None:
    m = json.loads((GOLDEN / "manifest.json").read_text())
    assert "cores_layout" not in m and m["modules"][QMOD]["quant"]["cores"] == {"bits": 4, "group_size": 3}
    with safe_open(str(GOLDEN / "cores/alpha.safetensors"), "pt") as f:
        assert set(f.keys()) == {"model.layers.0.self_attn.q_proj.S", "model.layers.1.self_attn.q_proj.S",
                                 f"{QMOD}.S.q", f"{QMOD}.S.scale"}


def test_old_and_packed_bundles_read_the_same_cores(layouts) -> None:
    old, packed = layouts
    bo, bp = Bundle.open(old), Bundle.open(packed)
    assert bo.manifest.cores_layout == "per-module" and bp.manifest.cores_layout == "packed"
    with safe_open(str(packed / "cores/alpha.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["cores", "cores.q", "cores.scale"]
    for name in bo.names:
        expected = read_cores(old, name)  # the format as documented, without soppu's reader
        assert set(expected) == {f"{m}.S" for m in bo.modules}
        assert expected[f"{QMOD}.S"].abs().sum() > 0
        for got in (bo.load_cores(name), bp.load_cores(name), read_cores(packed, name)):
            assert set(got) == set(expected)
            for key, value in expected.items():
                torch.testing.assert_close(got[key].double(), value, rtol=0, atol=0)


def test_old_and_packed_bundles_export_the_same_peft(layouts, tmp_path) -> None:
    old, packed = layouts
    for name in ("alpha", "beta"):
        a = load_file(str(export_peft(old, name, tmp_path / f"{name}-old") / "adapter_model.safetensors"))
        b = load_file(str(export_peft(packed, name, tmp_path / f"{name}-packed") / "adapter_model.safetensors"))
        assert set(a) == set(b) and len(a) == 6
        cores = read_cores(old, name)
        basis = load_file(str(old / "basis.safetensors"))
        for key in a:
            assert torch.equal(a[key], b[key])
        for module in Bundle.open(old).modules:  # lora_B = U S, lora_A = V.T
            B = a[f"base_model.model.{module}.lora_B.weight"].double()
            torch.testing.assert_close(B, basis[f"{module}.U"].double() @ cores[f"{module}.S"], rtol=1e-6, atol=1e-7)


def test_registry_checks_accept_both_layouts(layouts) -> None:
    for bundle in layouts:
        m = Manifest.from_json(json.loads((bundle / "manifest.json").read_text()))
        for rel in m.files:
            if not rel.endswith(".safetensors"):
                continue
            exp = m.expected_tensors(rel)
            validate_safetensors(bundle / rel, expected=exp, name=rel, max_header_bytes=header_cap(exp))
            names = scale_tensor_names(m, rel)
            with safe_open(str(bundle / rel), "np") as f:
                check_scales(m, rel, {n: f.get_tensor(n) for n in names}, "test")
            assert m.safetensors_bytes(rel) == (bundle / rel).stat().st_size  # header size predicted exactly
        assert len(m.expected_tensors("cores/alpha.safetensors")) == (3 if m.packed else 4)


def test_zero_scale_in_a_packed_core_names_the_module(layouts, tmp_path) -> None:
    _, packed = layouts
    m = Bundle.open(packed).manifest
    seg = next(s for s in m.core_segments() if s.module == QMOD)
    with safe_open(str(packed / "cores/beta.safetensors"), "np") as f:
        scales = f.get_tensor("cores.scale").copy()
    scales[seg.scale_offset + seg.scale_size - 1] = 0
    with pytest.raises(BundleError) as info:
        check_scales(m, "cores/beta.safetensors", {"cores.scale": scales}, "upload")
    assert str(info.value) == ("upload: cores/beta.safetensors has malformed quantization scales:\n"
                               f"  - module `{QMOD}`: `cores.scale`[{seg.scale_offset}:{seg.scale_offset + seg.scale_size}]"
                               " (cores scales) has 1 zero or negative entries (scales must be > 0)\n"
                               "re-run `soppu compress --bits ...` to write the bundle again")


def test_unknown_core_layout_is_refused(tmp_path) -> None:
    data = json.loads((GOLDEN / "manifest.json").read_text())
    data["cores_layout"] = "zipped"
    with pytest.raises(BundleError, match=r"`cores_layout` 'zipped' is not one of per-module, packed"):
        Manifest.from_json(data)


def test_packed_layout_segments_are_sorted_and_contiguous(layouts) -> None:
    _, packed = layouts
    segs = Bundle.open(packed).manifest.core_segments()
    assert [s.module for s in segs] == sorted(s.module for s in segs)
    floats = [s for s in segs if s.spec is None]
    assert [s.offset for s in floats] == [0, 9] and floats[-1].offset + floats[-1].size == 18
    q = next(s for s in segs if s.spec is not None)
    assert (q.offset, q.size, q.scale_offset, q.scale_size) == (0, 2, 0, 2)  # 4 codes x 4 bits; 4 / 3 -> 2 groups
    assert np.isclose(sum(s.size for s in floats), 18)
