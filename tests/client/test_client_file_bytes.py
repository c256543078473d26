"""Bytes counted as files: the manifest's sizes, the --budget plan and `soppu inspect` against
os.stat of the written bundle; the packed core layout against the per-module one."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from soppu_client.cli import cli as cli_main
from soppu_client.compress import CompressConfig
from soppu_client.compress.pipeline import compress_adapters
from soppu_client.format.bundle import Bundle, export_peft
from soppu_client.format.file_bytes import header_bytes
from tests.client.bundle_files import read_cores, relayout
from tests.client.conftest import example_adapter_dirs


def _stat(bundle: Path) -> dict[str, int]:
    files = [p for p in bundle.rglob("*") if p.is_file()]
    st = [p for p in files if p.suffix == ".safetensors"]
    return {"safetensors": sum(p.stat().st_size for p in st), "all": sum(p.stat().st_size for p in files),
            "headers": sum(8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in st)}


def _header_share(path: Path) -> float:
    return (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) / path.stat().st_size


@pytest.fixture(scope="module")
def budget_bundle(peft_adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fb") / "b10"
    compress_adapters(peft_adapters, out, CompressConfig(rank=8, budget="10x"))
    return out


def test_recorded_sizes_equal_the_files_on_disk(budget_bundle: Path) -> None:
    m = Bundle.open(budget_bundle).manifest
    sizes, disk = m.metrics.sizes, _stat(budget_bundle)
    assert disk["headers"] > 0 and sizes.tensor_bytes + disk["headers"] == disk["safetensors"]
    assert sizes.safetensors_bytes == disk["safetensors"]
    assert sizes.file_bytes == disk["all"]  # manifest.json (its own size included) + metrics.json + tensors
    assert sizes.file_bytes == sum(f.size for f in m.files.values()) + (budget_bundle / "manifest.json").stat().st_size
    assert sizes.tensor_bf16_ratio > sizes.safetensors_bf16_ratio > sizes.file_bf16_ratio == sizes.bf16_byte_ratio
    for rel in m.files:
        if rel.endswith(".safetensors"):
            assert m.safetensors_bytes(rel) == (budget_bundle / rel).stat().st_size


def test_budget_counts_file_bytes_and_plans_headers_exactly(budget_bundle: Path) -> None:
    m = Bundle.open(budget_bundle).manifest
    plan, sizes = m.fit["storage"], m.metrics.sizes
    assert plan["budget_bytes"] == sizes.source_bf16_bytes // 10
    assert plan["planned_safetensors_bytes"] == sizes.safetensors_bytes  # exact
    json_bytes = sizes.file_bytes - sizes.safetensors_bytes
    # the JSON files were bounded before the fit: never under, over by less than a quarter
    assert json_bytes <= plan["json_bytes_bound"] < 1.25 * json_bytes
    assert sizes.file_bytes <= plan["planned_file_bytes"] <= plan["budget_bytes"]
    assert sizes.bf16_byte_ratio >= 10


def test_packed_core_headers_are_under_two_percent_on_the_examples(tmp_path) -> None:
    dirs = example_adapter_dirs()
    if len(dirs) < 12:
        pytest.skip("examples/adapters is not present")
    out = tmp_path / "ex9"
    m = compress_adapters(dirs, out, CompressConfig(rank=32, budget="9x"))
    sizes = m.metrics.sizes
    assert sizes.file_bytes == _stat(out)["all"] <= m.fit["storage"]["budget_bytes"]
    for name in m.names:
        core = out / m.adapters[name].core
        assert _header_share(core) < 0.02
        # the same cores one entry per module (the per-module layout) carry a header many times larger
        per_module = {f"{x}.S{suffix}": ("U8", (1,)) for x in m.modules for suffix in
                      ((".q", ".scale") if m.quant_spec(x, "cores") else ("",))}
        assert header_bytes(per_module, {"format": "soppu-bundle/1"}) > 10 * (8 + struct.unpack("<Q", core.read_bytes()[:8])[0])


def test_packed_and_per_module_bundles_read_and_export_alike(budget_bundle: Path, tmp_path) -> None:
    packed = Bundle.open(budget_bundle)
    assert packed.manifest.cores_layout == "packed" and any(packed.manifest.quant_spec(x, "cores") for x in packed.modules)
    old = Bundle.open(relayout(budget_bundle, tmp_path / "old", "per-module"))
    assert old.manifest.cores_layout == "per-module"
    assert "cores_layout" not in json.loads((old.path / "manifest.json").read_text())
    assert old.manifest.metrics.sizes.file_bytes > packed.manifest.metrics.sizes.file_bytes  # headers cost bytes
    assert old.manifest.metrics.sizes.file_bytes == _stat(old.path)["all"]
    for name in packed.names:
        a, b, ref = packed.load_cores(name), old.load_cores(name), read_cores(budget_bundle, name)
        assert set(a) == set(b) == set(ref) and any(t.abs().sum() > 0 for t in ref.values())
        for key in ref:
            assert torch.equal(a[key], b[key])
            torch.testing.assert_close(a[key].double(), ref[key], rtol=0, atol=0)
        pa = load_file(str(export_peft(packed, name, tmp_path / f"{name}-a") / "adapter_model.safetensors"))
        pb = load_file(str(export_peft(old, name, tmp_path / f"{name}-b") / "adapter_model.safetensors"))
        assert set(pa) == set(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_inspect_shows_file_bytes_and_the_byte_ratio(budget_bundle: Path) -> None:
    sizes = Bundle.open(budget_bundle).manifest.metrics.sizes
    res = CliRunner().invoke(cli_main, ["inspect", str(budget_bundle), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    disk = payload["disk"]
    assert disk["file_bytes"] == sizes.file_bytes and disk["safetensors_bytes"] == sizes.safetensors_bytes
    assert disk["tensor_bytes"] == sizes.tensor_bytes and disk["signature_bytes"] == 0
    assert disk["bf16_byte_ratio"] == pytest.approx(sizes.bf16_byte_ratio)
    assert payload["sizes"]["file_bytes"] == sizes.file_bytes
    assert payload["sizes"]["bf16_byte_ratio"] == pytest.approx(sizes.source_bf16_bytes / sizes.file_bytes)
    text = CliRunner().invoke(cli_main, ["inspect", str(budget_bundle)]).output
    src = sizes.source_bf16_bytes
    assert (f"bytes vs the sources at bf16 ({src:,}): tensors {sizes.tensor_bytes:,} = {src / sizes.tensor_bytes:.2f}x, "
            f"safetensors files {sizes.safetensors_bytes:,} = {src / sizes.safetensors_bytes:.2f}x, "
            f"all files {sizes.file_bytes:,} = {src / sizes.file_bytes:.2f}x") in text
    assert f"on disk     {sizes.file_bytes:,} bytes = tensors {sizes.tensor_bytes:,}" in text
    assert "core files  packed layout" in text


def test_inspect_of_an_old_bundle_counts_its_files_from_disk(tmp_path) -> None:
    golden = Path(__file__).parents[1] / "format" / "data" / "bundle_per_module"
    text = CliRunner().invoke(cli_main, ["inspect", str(golden)]).output
    total = sum(p.stat().st_size for p in golden.rglob("*") if p.is_file())
    assert f"on disk     {total:,} bytes" in text and "core files  per-module layout" in text
    assert os.path.isfile(golden / "manifest.json")
