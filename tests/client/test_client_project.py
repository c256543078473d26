"""Projection of new adapters onto a published basis (no refit), against dense references."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from soppu_client.format.bundle import Bundle, export_peft
from soppu_client.compress import CompressConfig
from soppu_client.compress.pipeline import compress_adapters, project_adapters
from soppu_client.format.errors import InputError
from tests.client.bundle_files import read_cores


@pytest.fixture(scope="module")
def base_bundle(peft_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("proj") / "base"
    compress_adapters(peft_adapters[:2], out, CompressConfig(rank=6))
    return out


def test_projected_cores_are_the_best_for_the_fixed_basis(base_bundle, peft_adapters, tmp_path):
    """S = U.T dW V (dense numpy) for a new adapter; the basis file is reused byte for byte."""
    out = tmp_path / "proj"
    manifest = project_adapters([peft_adapters[2]], base_bundle, out)
    assert (out / "basis.safetensors").read_bytes() == (base_bundle / "basis.safetensors").read_bytes()
    assert manifest.files["basis.safetensors"] == Bundle.open(base_bundle).manifest.files["basis.safetensors"]
    bundle = Bundle.open(out)
    assert bundle.names == ["gamma"]
    from soppu_client.adapters import load_collection

    collection = load_collection([peft_adapters[2]])
    module = "model.layers.4.self_attn.v_proj"
    (A, B), = collection.module_factors(module, dtype=np.float64)
    with safe_open(str(out / "basis.safetensors"), "np") as fb:
        U, V = fb.get_tensor(f"{module}.U"), fb.get_tensor(f"{module}.V")
    S = read_cores(out, "gamma")[f"{module}.S"].float().numpy()
    dW = B @ A
    np.testing.assert_allclose(S, U.T.astype(np.float64) @ dW @ V.astype(np.float64), rtol=1e-4, atol=1e-7)
    dense = np.linalg.norm(dW - U @ S @ V.T) / np.linalg.norm(dW)
    reported = manifest.metrics.summary["adapters"]["gamma"]["mean_module_error"]
    assert 0 < dense <= 1 and 0 < reported <= 1
    # an adapter the basis was fitted for is served better than the newcomer
    fitted = Bundle.open(base_bundle).manifest.metrics.summary["mean_error"]
    assert manifest.metrics.summary["mean_error"] > fitted
    assert export_peft(bundle, "gamma", tmp_path / "gamma-peft").is_dir()


def test_refused_inputs(base_bundle, peft_adapters, tmp_path):
    with pytest.raises(InputError) as info:
        project_adapters([peft_adapters[0]], base_bundle, tmp_path / "x")
    assert str(info.value) == (
        f"cannot project onto {base_bundle}: adapter name(s) `alpha` already in the bundle; rename the directories"
    )
    assert not (tmp_path / "x").exists()


def test_cli_project(base_bundle, peft_adapters, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "soppu_client.cli", "project", str(peft_adapters[2]), "--onto",
                           str(base_bundle), "-o", str(tmp_path / "p"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["ok"] and payload["metrics"]["sizes"]["params_cores"] == 60 * 36
