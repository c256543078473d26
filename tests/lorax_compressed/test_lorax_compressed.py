"""Compressed mode inside LoRAX's own layer code (patched checkout, LORAX_PYTHON, CPU).

A prefill batch of base-model tokens and tokens of three compressed adapters (two sharing a basis,
one full and one diag bundle) goes through the patched forward_layer_type; each token's output must
equal PEFT on the adapter exported from the same bundle, and the reference op. The adapters come
from local dirs (source ``local``) or from a real registry on loopback (source ``soppu`` with
SOPPU_SERVE_FORMAT=compressed: fetched, verified and written into the cache by the soppu source)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax_adapter_source import compressed as lc
from soppu_client.format import compressed_form as cf
from tests.lorax import loraxkit as lx
from tests.lorax_compressed.compressedkit import (
    MODULES,
    N_LAYERS,
    abs_product,
    matmul_tolerance,
    peft_layer,
)
from tests.serving import srckit

pytestmark = pytest.mark.lorax

NAMES = ["a0", "a1", "b0"]
TOKEN_ADAPTER = [0, 0, 0, -1, -1, 1, 1, 2, 2, 2, -1]  # prefill: contiguous per request


def _run_side(patched: Path, peft_model, adapters: list[str], source: str, tmp_path: Path,
              env_extra: dict[str, str] | None = None, token_adapter: list[int] = TOKEN_ADAPTER
              ) -> tuple[dict, torch.Tensor, dict]:
    """Run lorax_compressed_side.py on ``adapters``; returns (report, x, layer outputs)."""
    torch.manual_seed(3)
    x = torch.randn(len(token_adapter), 576)
    inputs = {"x": x}
    for module in MODULES:
        i, t = int(module.split(".")[2]), module.split(".")[-1]
        inputs[f"{i}.{t}.weight"] = peft_layer(peft_model, module).base_layer.weight.detach().float().contiguous()
    save_file(inputs, str(tmp_path / "in.safetensors"))
    args = {"adapters": adapters, "source": source, "model_id": srckit.BASE_MODEL, "n_layers": N_LAYERS,
            "token_adapter": token_adapter, "inputs": str(tmp_path / "in.safetensors"),
            "out": str(tmp_path / "out.safetensors")}
    env = lx.lorax_env(patched, **(env_extra or {}))
    proc = subprocess.run([lx.lorax_python(), str(Path(__file__).with_name("lorax_compressed_side.py")),
                           json.dumps(args)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, x, load_file(str(tmp_path / "out.safetensors"))


def _check_served(report: dict, x: torch.Tensor, got_all: dict, dirs: dict[str, Path], peft_model) -> None:
    """What LoRAX loaded and computed for NAMES, whose compressed dirs are ``dirs``."""
    cfg = {n: cf.read_compressed_config(dirs[n]) for n in NAMES}
    assert report["types"] == ["SoppuCompressedConfig"] * 3
    assert [Path(d).resolve() for d in report["adapter_dirs"]] == [Path(dirs[n]).resolve() for n in NAMES]
    assert report["unused"] == [[], [], []]
    # bytes moved: a0 brings its basis; a1 shares it (resident): cores only; b0 brings another basis
    assert report["bytes"] == [cfg["a0"]["cores"]["size"] + cfg["a0"]["basis"]["size"], cfg["a1"]["cores"]["size"],
                               cfg["b0"]["cores"]["size"] + cfg["b0"]["basis"]["size"]]
    assert report["registry_loads"] == 4  # 2 bases x 2 layer types, each created once
    assert report["shared_basis"] == {"q_proj": [True, True, False], "v_proj": [True, True, False]}
    # cores only per adapter: [n_layers, k, k] (full) / [n_layers, k] (diag) in float32
    assert report["core_bytes"] == [N_LAYERS * 8 * 8 * 4, N_LAYERS * 8 * 8 * 4, N_LAYERS * 6 * 4]
    assert report["resident_bytes"] == 4 * N_LAYERS * ((576 + 576) + (192 + 576)) * (8 + 6)
    assert report["batch_types"] == {"q_proj": ["soppu"], "v_proj": ["soppu"]}
    assert report["groups"] == {"q_proj": 2, "v_proj": 2}

    _check_outputs(peft_model, x, got_all, TOKEN_ADAPTER, {n: dirs[n] for n in NAMES})


def _check_outputs(model, x: torch.Tensor, got_all: dict, token_adapter: list[int], dirs: dict[str, Path],
                   ranks: dict[str, int] | None = None) -> None:
    """Each token's layer output (``got_all``) equals PEFT on its adapter (``model``, the adapters of
    ``dirs`` loaded under their names, in token-index order) and the reference op on that adapter's
    compressed tensors; base tokens (-1) equal the base layer. ``ranks``: each module's expected k."""
    idx = torch.tensor(token_adapter)
    loaded = {n: cf.load_compressed(d) for n, d in dirs.items()}
    for module in MODULES:
        i, t = int(module.split(".")[2]), module.split(".")[-1]
        got = got_all[f"{i}.{t}"]
        layer = peft_layer(model, module)
        W = layer.base_layer.weight
        with torch.no_grad():
            base_y = layer.base_layer(x)
            for j, n in enumerate(dirs):
                rows = idx == j
                model.set_adapter(n)
                want = layer(x[rows])
                c, basis, cores = loaded[n]
                U, S, V = basis[f"{module}.U"], cores[f"{module}.S"], basis[f"{module}.V"]
                if ranks is not None:  # the unpadded per-module k
                    assert U.shape[1] == V.shape[1] == S.shape[0] == ranks[module]
                tol = matmul_tolerance(x[rows], W.abs() + abs_product(U, S, V.T))
                # the adapter changes this layer far beyond what rounding may: the check is not vacuous
                assert (want - base_y[rows]).abs().max() > 20 * tol["atol"]
                torch.testing.assert_close(got[rows], want, **tol)
                # and the reference op on this adapter's tokens alone
                ref = lc.apply_compressed(base_y[rows].clone(), x[rows], U, V, S[None],
                                          torch.zeros(int(rows.sum()), dtype=torch.long),
                                          diag=c["method"] == "diag", backend="reference")
                torch.testing.assert_close(got[rows], ref, **tol)
        torch.testing.assert_close(got[idx < 0], base_y[idx < 0], **matmul_tolerance(x[idx < 0], W.abs()))


def test_lorax_forward_layer_type_serves_compressed_adapters(patched, compressed, peft_model, tmp_path) -> None:
    dirs = compressed["dirs"]
    report, x, got = _run_side(patched, peft_model, [str(dirs[n]) for n in NAMES], "local", tmp_path)
    _check_served(report, x, got, dirs, peft_model)


def test_lorax_serves_compressed_adapters_from_the_registry(patched, compressed, peft_model, tmp_path) -> None:
    """source ``soppu``, SOPPU_SERVE_FORMAT=compressed: registry -> verify -> compressed dir in the cache
    -> LoRAX's loader and forward; the served files are byte-identical to the local export."""
    reg = srckit.start_registry(tmp_path)
    try:
        for bundle in (compressed["bundles"]["a0"], compressed["bundles"]["b0"]):
            reg.publish(bundle, version=1)
        cache = tmp_path / "cache"
        report, x, got = _run_side(
            patched, peft_model, [f"{reg.owner}/{n}" for n in NAMES], "soppu", tmp_path,
            {"SOPPU_REGISTRY_URL": reg.url, "SOPPU_REGISTRY_TOKEN": reg.serving_token,
             "SOPPU_CACHE_DIR": str(cache), "SOPPU_SERVE_FORMAT": "compressed"})
    finally:
        reg.stop()
    served = {n: cache / ".compressed" / reg.owner / n / "v1" for n in NAMES}
    for n in NAMES:
        mine, local = cf.read_compressed_config(served[n]), cf.read_compressed_config(compressed["dirs"][n])
        assert (mine["basis"]["sha256"], mine["cores"]["sha256"]) == (local["basis"]["sha256"], local["cores"]["sha256"])
    _check_served(report, x, got, served, peft_model)


def test_lorax_serves_a_mixed_rank_bundle(patched, mixed, tmp_path) -> None:
    """A ``--budget`` bundle, whose k differs between modules (checked first), through LoRAX's loader and
    forward: each layer type's bases and cores are zero-padded to its largest k (exact), so every
    token's output equals PEFT on the same adapter exported with its rank_pattern, and the reference
    op on the unpadded per-module tensors."""
    names = ["m0", "m1"]
    tokens = [0, 0, -1, 1, 1, 1, -1, 0, 0]
    ranks = {m: mixed["bundle"].manifest.module_rank(m) for m in mixed["bundle"].modules}
    assert len(set(ranks.values())) > 1, ranks  # the bundle really mixes ranks
    model, dirs = mixed["model"], mixed["dirs"]
    report, x, got_all = _run_side(patched, model, [str(dirs[n]) for n in names], "local", tmp_path,
                                   token_adapter=tokens)
    assert report["types"] == ["SoppuCompressedConfig"] * 2 and report["unused"] == [[], []]
    assert report["shared_basis"] == {"q_proj": [True, True], "v_proj": [True, True]}
    k_max = {t: max(k for m, k in ranks.items() if m.endswith(t)) for t in ("q_proj", "v_proj")}
    # cores resident per adapter: [n_layers, k_max(q_proj), k_max(q_proj)] float32
    assert report["core_bytes"] == [N_LAYERS * k_max["q_proj"] ** 2 * 4] * 2
    _check_outputs(model, x, got_all, tokens, {n: dirs[n] for n in names}, ranks)
