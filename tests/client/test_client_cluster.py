"""Clustering: two groups of adapters with different subspaces get their own bases."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file

from soppu_client.adapters import load_collection
from soppu_client.format.bundle import Bundle, export_peft
from soppu_client.compress import CompressConfig, assign_clusters
from soppu_client.compress.pipeline import compress_collection
from soppu_client.verify import verify_weights

SHAPES = {"q_proj": (48, 40), "v_proj": (24, 40)}


def _write_group_adapters(root, groups=(0, 1, 0, 1, 0, 1), layers=3, r=4, shared=5, seed=0):
    """PEFT dirs; adapters of one group draw their factors from that group's subspaces."""
    g = torch.Generator().manual_seed(seed)
    spaces = {
        (grp, layer, m): (torch.randn(d_out, shared, generator=g), torch.randn(d_in, shared, generator=g))
        for grp in set(groups) for layer in range(layers) for m, (d_out, d_in) in SHAPES.items()
    }
    dirs = []
    for i, grp in enumerate(groups):
        d = root / f"ad{i}"
        d.mkdir()
        tensors = {}
        for layer in range(layers):
            for m in SHAPES:
                Ub, Vb = spaces[(grp, layer, m)]
                key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                tensors[f"{key}.lora_B.weight"] = (Ub @ torch.randn(shared, r, generator=g)).contiguous()
                tensors[f"{key}.lora_A.weight"] = (torch.randn(r, shared, generator=g) @ Vb.T).contiguous()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "toy", "task_type": "CAUSAL_LM"}))
        dirs.append(d)
    return dirs


def test_clusters_recover_groups_and_lower_the_error(tmp_path):
    dirs = _write_group_adapters(tmp_path)
    collection = load_collection(dirs)
    assert assign_clusters(collection, 2, rank=5, seed=0) == [0, 1, 0, 1, 0, 1]
    one = compress_collection(collection, tmp_path / "c1", CompressConfig(rank=5))
    two = compress_collection(collection, tmp_path / "c2", CompressConfig(rank=5, clusters=2))
    assert two.clusters == 2 and [a.cluster for a in two.adapters.values()] == [0, 1, 0, 1, 0, 1]
    e1, e2 = one.metrics.summary["mean_error"], two.metrics.summary["mean_error"]
    assert e1 > 0.3  # one basis of rank 5 cannot hold two 5-dim subspaces
    assert e2 < 1e-4  # each group's subspace fits its own basis
    assert two.metrics.sizes.params_basis == 2 * one.metrics.sizes.params_basis


def test_clustered_bundle_verifies_and_exports(tmp_path):
    dirs = _write_group_adapters(tmp_path, groups=(0, 1, 1, 0))
    collection = load_collection(dirs)
    manifest = compress_collection(collection, tmp_path / "b", CompressConfig(rank=3, clusters=2))
    bundle = Bundle.open(tmp_path / "b")
    assert "model.layers.0.self_attn.q_proj.c1.U" in bundle.load_basis()
    summary, _ = verify_weights(bundle, collection)
    for name, a in summary["adapters"].items():
        assert abs(a["error"] - manifest.metrics.summary["adapters"][name]["error"]) < 1e-6
        assert a["error"] > 0.01
    out = export_peft(bundle, "ad2", tmp_path / "exported-ad2")
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        B = f.get_tensor("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    basis = bundle.load_basis()
    core = bundle.load_cores("ad2")["model.layers.1.self_attn.v_proj.S"]
    np.testing.assert_allclose(B.numpy(), (basis["model.layers.1.self_attn.v_proj.c1.U"] @ core).numpy(), rtol=1e-6)


def test_projection_joins_the_right_cluster(tmp_path):
    from soppu_client.compress.pipeline import project_adapters

    dirs = _write_group_adapters(tmp_path, groups=(0, 1, 0, 1, 1, 0))
    compress_collection(load_collection(dirs[:4]), tmp_path / "b", CompressConfig(rank=5, clusters=2))
    base = Bundle.open(tmp_path / "b")
    group_cluster = {0: base.cluster_of("ad0"), 1: base.cluster_of("ad1")}
    assert group_cluster[0] != group_cluster[1]
    manifest = project_adapters(dirs[4:], tmp_path / "b", tmp_path / "p")
    assert manifest.adapters["ad4"].cluster == group_cluster[1]
    assert manifest.adapters["ad5"].cluster == group_cluster[0]
    assert manifest.metrics.summary["max_error"] < 1e-4  # their group's subspace is in the basis
