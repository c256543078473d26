"""A bundle made by `soppu project` reads like any other: `inspect` and `verify` on it, run as a
user runs them (real CLI subprocesses, real PEFT adapters on SmolLM2), with typed sizes that have
the same keys whichever pipeline wrote them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from soppu_client.format.bundle import Bundle, Manifest, canonical_dumps

SOPPU = [sys.executable, "-m", "soppu_client.cli"]
K = 6
MODULES = 60  # q_proj and v_proj of SmolLM2-135M's 30 layers


def run(*args: object) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SOPPU, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def bundles(peft_adapters, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("projected")
    run("compress", *peft_adapters[:2], "-o", root / "base", "--rank", K)
    payload = json.loads(run("project", peft_adapters[2], "--onto", root / "base", "-o", root / "proj", "--json").stdout)
    assert payload["ok"] and payload["metrics"]["sizes"]["basis_reused"] is True
    return root / "base", root / "proj"


def test_inspect_projected_bundle(bundles, peft_adapters):
    base, proj = bundles
    text = run("inspect", proj).stdout
    base_sizes = json.loads(run("inspect", base, "--json").stdout)["manifest"]["metrics"]["sizes"]
    sizes = json.loads(run("inspect", proj, "--json").stdout)["manifest"]["metrics"]["sizes"]
    assert set(sizes) == set(base_sizes)  # one Sizes, one set of keys
    assert sizes["basis_reused"] is True and base_sizes["basis_reused"] is False
    assert sizes["params_basis"] == base_sizes["params_basis"] == MODULES * K * (576 + 576 + 192 + 576) // 2
    assert sizes["params_cores"] == sizes["params_after"] == MODULES * K * K  # only the cores are new
    assert sizes["tensor_bytes"] == MODULES * K * K * 4  # float32 cores, the basis is not rewritten
    assert sizes["source_bytes"] == (peft_adapters[2] / "adapter_model.safetensors").stat().st_size
    assert sizes["param_ratio"] == pytest.approx(sizes["params_before"] / sizes["params_cores"])
    report = json.loads(run("inspect", proj, "--json").stdout)["sizes"]
    assert sizes["param_ratio"] > 1 and report["byte_ratio"] > 1 and "byte_ratio" not in sizes
    # the bytes this bundle adds: its cores, metrics.json and manifest.json, not the reused basis
    assert sizes["file_bytes"] == sum(p.stat().st_size for p in proj.rglob("*") if p.is_file()) \
        - (proj / "basis.safetensors").stat().st_size
    assert (f"parameters: {sizes['params_before']:,} -> {sizes['params_after']:,} "
            f"(cores {sizes['params_cores']:,}; basis {sizes['params_basis']:,} reused)") in text
    assert (f"bytes: {sizes['source_bytes']:,} (adapter files) -> {sizes['file_bytes']:,} (bundle files, basis not "
            "counted)") in text


def test_verify_projected_bundle(bundles, peft_adapters):
    _, proj = bundles
    text = run("verify", proj, "--adapters", peft_adapters[2]).stdout
    assert "gamma" in text and "reused" in text
    payload = json.loads(run("verify", proj, "--adapters", peft_adapters[2], "--json").stdout)
    manifest = Bundle.open(proj).manifest
    assert payload["ok"] and payload["sizes"] == manifest.metrics.sizes.to_json()
    error = payload["weights"]["adapters"]["gamma"]["error"]
    assert 0.01 < error < 1  # a real, non-zero projection error ...
    assert error == pytest.approx(manifest.metrics.summary["adapters"]["gamma"]["error"], rel=1e-6)  # ... as recorded


def test_one_reader_reproduces_the_producers_bytes(bundles):
    for bundle in bundles:
        text = (bundle / "manifest.json").read_text(encoding="utf-8")
        assert canonical_dumps(Manifest.from_json(json.loads(text)).to_json()) == text


def test_bundle_written_before_typed_sizes_still_reads(bundles, peft_adapters, tmp_path):
    """Older `soppu project` wrote `params_basis_reused` and no byte counts; such a bundle opens."""
    _, proj = bundles
    old = tmp_path / "old"
    shutil.copytree(proj, old)
    data = json.loads((old / "manifest.json").read_text())
    sizes = data["metrics"]["sizes"]
    data["metrics"]["sizes"] = {"params_before": sizes["params_before"], "params_after": sizes["params_cores"],
                                "params_basis_reused": sizes["params_basis"], "params_cores": sizes["params_cores"],
                                "param_ratio": sizes["param_ratio"]}
    (old / "manifest.json").write_text(json.dumps(data))  # manifest.json is not among its own `files`
    read = Bundle.open(old).manifest.metrics.sizes
    assert read.basis_reused and read.params_basis == sizes["params_basis"] and read.tensor_bytes is None
    assert "basis" in run("inspect", old).stdout and "bytes:" not in run("inspect", old).stdout
    run("verify", old, "--adapters", peft_adapters[2])
