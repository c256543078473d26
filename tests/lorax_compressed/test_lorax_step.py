"""Compressed mode in LoRAX's decode path (patched checkout, LORAX_PYTHON, CPU): CUDA graphs refused
for SOPPU batches (patch 0008), routing once per step and cores stacked once per load (op counts of
a decode step over 2 and 4 layers), and each basis charged once (download / load / offload)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.lorax import loraxkit as lx
from tests.serving import srckit

pytestmark = pytest.mark.lorax

SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}
TOKENS = {"one_basis": [1, 0, 2, 1, 2], "two_bases": [1, 3, 0, 2, 3, 1]}  # LoRAX indices: a0 1, a1 2, b0 3


@pytest.fixture(scope="module")
def run(patched, compressed4, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("step")
    g = torch.Generator().manual_seed(5)
    inputs = {f"{i}.{t}.weight": torch.randn(*shape, generator=g) / 24 for i in range(4) for t, shape in SHAPES.items()}
    inputs.update({f"x_{s}": torch.randn(len(toks), 576, generator=g) for s, toks in TOKENS.items()})
    save_file(inputs, str(tmp / "in.safetensors"))
    args = {"adapters": {n: str(d) for n, d in compressed4.items()}, "model_id": srckit.BASE_MODEL,
            "inputs": str(tmp / "in.safetensors"), "out": str(tmp / "out.safetensors")}
    proc = subprocess.run([lx.lorax_python(), str(Path(__file__).with_name("lorax_step_side.py")), json.dumps(args)],
                          env=lx.lorax_env(patched), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"report": report, "inputs": inputs, "outputs": load_file(str(tmp / "out.safetensors"))}


def test_cuda_graph_refused_for_soppu_batches(run) -> None:
    """LoRAX's can_use_graph on a decode batch of SOPPU adapters only: stock LoRAX would replay a graph
    traced without them (max LoRA rank 0); with patch 0008 the batch runs eager."""
    g = run["report"]["graph"]
    assert g["hook_is_ours"]
    assert g["adapter_keys"] == ["soppu"] and g["max_rank"] == 0
    assert g["stock"] is True  # non-vacuous: without the fix the graph would be used
    assert g["patched"] is False
    assert g["patched_base_only"] is True  # a batch without SOPPU data still uses the graphs


ROUTING = ("aten::sort", "aten::searchsorted", "aten::arange", "aten::lift_fresh")


def _minus(a: dict, b: dict) -> dict:
    out = {k: a.get(k, 0) - b.get(k, 0) for k in set(a) | set(b)}
    return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("scenario,groups", [("one_basis", 1), ("two_bases", 2)])
def test_routing_once_per_step_not_per_layer(run, scenario, groups) -> None:
    """aten ops of one decode step (from_meta + every layer's forward), on 2 and on 4 layers."""
    ops = run["report"]["ops"]
    # the counter sees routing: the op called per layer without a step routing routes in every layer
    assert ops["per_layer_routing"]["aten::sort"] == ops["per_layer_routing"]["aten::searchsorted"] == 4
    c2, c4 = ops[f"{scenario}/2"], ops[f"{scenario}/4"]
    # the token -> slot lookup: once per basis per step, shared by both layer types, whatever the layers
    assert c2["load"] == c4["load"] == {"aten::lift_fresh": groups, "aten::index": groups}
    # the routing: once per step (first layer), the same on 2 and on 4 layers
    once2, once4 = _minus(c2["forward"], c2["again_forward"]), _minus(c4["forward"], c4["again_forward"])
    assert once2 == once4
    if groups == 1:  # identity routing: no sort, no search
        assert once4 == {"aten::arange": 2, "aten::mul": 1, "aten::zeros": 1}
    else:  # one route_tokens per basis
        assert once4["aten::sort"] == once4["aten::searchsorted"] == groups
    # everything else is per-layer work: 4 layers cost twice 2 layers, and none of it routes
    assert c4["again_forward"] == {k: 2 * v for k, v in c2["again_forward"].items()}
    assert not any(c4["again_forward"].get(op) for op in ROUTING)
    # an unchanged batch's next step reuses the step's index: no device op before the layers
    assert c2["again_load"] == c4["again_load"] == {}
    # cores are stacked when an adapter loads, never in a step
    for phase in ("load", "forward"):
        assert not {"aten::stack", "aten::cat"} & set(c4[phase])


def test_decode_outputs_equal_the_reference(run, compressed4) -> None:
    """The 4-layer model's outputs in both decode steps: per adapter, the reference op on its tokens."""
    import soppu_kernels as sk

    from soppu_client.format import compressed_form as cf
    from tests.lorax_compressed.compressedkit import abs_product, matmul_tolerance

    loaded = {n: cf.load_compressed(d) for n, d in compressed4.items()}
    index = {"a0": 1, "a1": 2, "b0": 3}
    inputs, outputs = run["inputs"], run["outputs"]
    for scenario, tokens in TOKENS.items():
        x, idx = inputs[f"x_{scenario}"], torch.tensor(tokens)
        for i in range(4):
            for t in SHAPES:
                module = f"model.layers.{i}.self_attn.{t}"
                W = inputs[f"{i}.{t}.weight"]
                got = outputs[f"{scenario}/{i}.{t}"]
                base_y = x @ W.T
                for n, a in index.items():
                    rows = idx == a
                    if not rows.any():
                        continue
                    cfg, basis, cores = loaded[n]
                    U, V, S = basis[f"{module}.U"], basis[f"{module}.V"], cores[f"{module}.S"]
                    want = sk.shared_basis_lora(base_y[rows].clone(), x[rows], U[None], V[None], S[None],
                                                torch.zeros(int(rows.sum()), dtype=torch.long), None,
                                                diag=cfg["method"] == "diag", backend="reference")
                    tol = matmul_tolerance(x[rows], W.abs() + abs_product(U, S, V.T))
                    assert (want - base_y[rows]).abs().max() > 20 * tol["atol"]  # not vacuous
                    torch.testing.assert_close(got[rows], want, **tol)
                torch.testing.assert_close(got[idx == 0], base_y[idx == 0], **matmul_tolerance(x[idx == 0], W.abs()))


def test_each_basis_charged_once_through_download_load_offload(run, compressed4) -> None:
    """LoRAX's download_adapter_weights / Model.load_adapter / Model.offload_adapter with a0, a1 (one
    basis) and b0 (another): a basis is charged with its first adapter, credited with its last."""
    from soppu_client.format import compressed_form as cf

    cfg = {n: cf.read_compressed_config(d) for n, d in compressed4.items()}
    A, B = cfg["a0"]["basis"], cfg["b0"]["basis"]
    assert cfg["a1"]["basis"]["sha256"] == A["sha256"] != B["sha256"]
    core = {n: cfg[n]["cores"]["size"] for n in cfg}
    m = run["report"]["memory"]
    assert m["start"] == {"charged": 0, "resident": [], "resident_bases": 0}
    s = m["steps"]
    # loads: each download counts a basis only when no loaded adapter uses it
    assert [x["bytes"] for x in s[:3]] == [core["a0"] + A["size"], core["a1"], core["b0"] + B["size"]]
    assert [x["charged"] for x in s[:3]] == [A["size"], A["size"], A["size"] + B["size"]]
    assert s[1]["resident_bases"] == 2 and s[2]["resident_bases"] == 4  # one copy per basis and layer type
    # offload a0: a1 still uses basis A, which stays resident and charged
    assert s[3]["offload"] == "a0" and s[3]["offloaded"]
    assert s[3]["charged"] == A["size"] + B["size"] and s[3]["resident"] == sorted([A["sha256"], B["sha256"]])
    assert s[3]["download_again"] == {"a0": core["a0"], "a1": core["a1"], "b0": core["b0"]}
    # offload a1, the last user of A: credited once, freed
    assert s[4]["charged"] == B["size"] and s[4]["resident"] == [B["sha256"]] and s[4]["resident_bases"] == 2
    assert s[4]["download_again"] == {"a0": core["a0"] + A["size"], "a1": core["a1"] + A["size"], "b0": core["b0"]}
    # offload b0: nothing charged, nothing resident
    assert s[5]["charged"] == 0 and s[5]["resident"] == [] and s[5]["resident_bases"] == 0
    assert s[5]["download_again"] == {"a0": core["a0"] + A["size"], "a1": core["a1"] + A["size"],
                                      "b0": core["b0"] + B["size"]}
