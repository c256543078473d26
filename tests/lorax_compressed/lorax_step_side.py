"""Runs under LORAX_PYTHON with a patched ``lorax_server`` (0001-0008), this repo and kernels/ on PYTHONPATH.

LoRAX's own serving code on SOPPU compressed adapters, on CPU, for three things:

* memory: ``download_adapter_weights`` (bytes a load adds) around LoRAX's ``Model.load_adapter`` and
  ``Model.offload_adapter``, and the registry's charged bytes, for two adapters sharing a basis
  (a0, a1) and one with another (b0);
* graph: LoRAX's ``GraphCache.can_use_graph`` on a decode batch built by ``AdapterBatchData.from_meta``,
  with the patch's hook removed (what stock LoRAX decides) and in place;
* ops: the aten ops of one decode step (``from_meta`` + every layer's forward) counted with a
  ``TorchDispatchMode``, for models of 2 and 4 layers, a batch on one basis and one on two bases;
  the layer outputs of the 4-layer model are written for the caller to check.

argv[1]: JSON {"adapters": {"a0": dir, "a1": dir, "b0": dir}, "model_id", "inputs", "out"}.
Prints one JSON report line.
"""

from __future__ import annotations

import collections
import json
import sys
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

args = json.loads(sys.argv[1])

from lorax_server.adapters.utils import download_adapter_weights  # noqa: E402
from lorax_server.adapters.weights import (  # noqa: E402
    AdapterBatchData,
    AdapterBatchMetadata,
    LayerAdapterWeights,
)
from lorax_server.models.model import Model  # noqa: E402
from lorax_server.pb.generate_pb2 import AdapterParameters  # noqa: E402
from lorax_server.utils import graph as lorax_graph  # noqa: E402

from lorax_adapter_source import compressed as lc  # noqa: E402
from tests.lorax.lorax_cpu_model import CpuModel, build_cpu_model  # noqa: E402

LAYER_TYPES = ("q_proj", "v_proj")
INDEX = {"a0": 1, "a1": 2, "b0": 3}  # LoRAX adapter indices (0: the base model)
inputs = load_file(args["inputs"])
report: dict = {}


class ServingModel(CpuModel):
    """CpuModel plus what LoRAX's own ``Model.load_adapter`` / ``offload_adapter`` read."""

    load_adapter = Model.load_adapter
    offload_adapter = Model.offload_adapter
    supports_adapter_loading = True

    def __init__(self, n_layers: int):
        base = build_cpu_model(inputs, n_layers, LAYER_TYPES)
        super().__init__(base.target_to_layer, n_layers)
        self.model_id = args["model_id"]
        self.trust_remote_code = False
        self.adapter_layers = list(LAYER_TYPES)
        self.layer_to_adapter_weights = {t: LayerAdapterWeights() for t in LAYER_TYPES}
        self.loaded_adapters: set[int] = set()
        self.preloaded_adapter_indices: set[int] = set()
        self.dynamic_adapter_loading_enabled = True

    def load(self, name: str) -> None:
        self.load_adapter(AdapterParameters(adapter_ids=[args["adapters"][name]]), "local", INDEX[name], None)

    def offload(self, name: str) -> bool:
        return self.offload_adapter(AdapterParameters(adapter_ids=[args["adapters"][name]]), "local", INDEX[name])


def download(name: str) -> int:
    return download_adapter_weights(args["adapters"][name], "local")


def state() -> dict:
    return {"charged": lc.REGISTRY.charged_bytes(),
            "resident": sorted({b.digest for b in lc.REGISTRY.resident()}),
            "resident_bases": len(lc.REGISTRY.resident())}


def decode_meta(tokens: list[int]) -> AdapterBatchMetadata:
    """A decode batch: one token per request (LoRAX makes a new adapter_indices tensor per batch)."""
    return AdapterBatchMetadata(adapter_indices=torch.tensor(tokens, dtype=torch.int64), adapter_list=list(tokens),
                                adapter_set=set(tokens), adapter_segments=torch.arange(len(tokens) + 1, dtype=torch.int32),
                                segment_indices=list(tokens))


# -- memory, part 1: download -> load, one adapter after another --------------------------------
m2 = ServingModel(2)
memory = {"start": state(), "steps": []}
for name in ("a0", "a1", "b0"):
    nbytes = download(name)  # what LoRAX charges this adapter, before it loads
    m2.load(name)
    memory["steps"].append({"download": name, "bytes": nbytes, **state()})

# -- graph: can_use_graph on a decode batch of SOPPU adapters only ------------------------------
tokens = [INDEX["a0"], INDEX["b0"], 0, INDEX["a1"]]
data = AdapterBatchData.from_meta(decode_meta(tokens), m2.layer_to_adapter_weights, {}, None, False, None)
base_data = AdapterBatchData.from_meta(decode_meta([0, 0]), m2.layer_to_adapter_weights, {}, None, False, None)
cache = lorax_graph.GraphCache.__new__(lorax_graph.GraphCache)  # can_use_graph reads only max_total_tokens
cache.max_total_tokens = 1024
batch = SimpleNamespace(input_ids=torch.zeros(len(tokens), dtype=torch.int64), max_current_length=16)
hook = lorax_graph.soppu_refuses_graph
cuda_available = torch.cuda.is_available
torch.cuda.is_available = lambda: True  # as on a GPU server: the rest of the decision is LoRAX's
try:
    lorax_graph.soppu_refuses_graph = None  # stock LoRAX: the patch's only change removed
    stock = cache.can_use_graph(batch, data)
    lorax_graph.soppu_refuses_graph = hook
    patched = cache.can_use_graph(batch, data)
    patched_base = cache.can_use_graph(SimpleNamespace(input_ids=torch.zeros(2), max_current_length=16), base_data)
finally:
    torch.cuda.is_available = cuda_available
    lorax_graph.soppu_refuses_graph = hook
report["graph"] = {"hook_is_ours": hook is lc.refuses_graph, "max_rank": data.max_rank,
                   "adapter_keys": sorted(data.adapter_keys()), "stock": stock, "patched": patched,
                   "patched_base_only": patched_base}
del data, base_data

# -- ops: one decode step over N layers ---------------------------------------------------------
m4 = ServingModel(4)
for name in ("a0", "a1", "b0"):
    m4.load(name)


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def step(model: ServingModel, tokens: list[int], x: torch.Tensor, meta: AdapterBatchMetadata | None = None):
    meta = meta or decode_meta(tokens)
    with torch.no_grad():
        with CountOps() as load_ops:
            data = AdapterBatchData.from_meta(meta, model.layer_to_adapter_weights, {}, None, False, None)
        outputs = {}
        with CountOps() as fwd_ops:
            for (i, t), (_, layer) in sorted(model.target_to_layer.items()):
                outputs[f"{i}.{t}"] = layer(x, data)
    return meta, dict(load_ops.ops), dict(fwd_ops.ops), outputs


SCENARIOS = {"one_basis": [INDEX["a0"], 0, INDEX["a1"], INDEX["a0"], INDEX["a1"]],
             "two_bases": [INDEX["a0"], INDEX["b0"], 0, INDEX["a1"], INDEX["b0"], INDEX["a0"]]}
ops: dict = {}
outputs: dict[str, torch.Tensor] = {}
for scenario, tokens in SCENARIOS.items():
    x = inputs[f"x_{scenario}"]
    for n, model in (("2", m2), ("4", m4)):
        meta, load_ops, fwd_ops, out = step(model, tokens, x)
        _, again_load, again_fwd, _ = step(model, tokens, x, meta)  # the next step of an unchanged batch
        ops[f"{scenario}/{n}"] = {"load": load_ops, "forward": fwd_ops, "again_load": again_load,
                                  "again_forward": again_fwd}
        if n == "4":
            outputs.update({f"{scenario}/{k}": v.contiguous() for k, v in out.items()})
# the counter sees routing when it happens per layer: the op called per layer without a step routing
basis = m4.layer_to_adapter_weights["q_proj"].adapter_weights[INDEX["a0"]].basis
x = inputs["x_one_basis"]
with torch.no_grad(), CountOps() as per_layer:
    for i in range(4):
        lc.apply_compressed(torch.zeros(x.shape[0], basis.U.shape[1]), x, basis.U[i], basis.V[i], basis.table.cores[i],
                            torch.tensor([0, -1, 1, 0, 1]), diag=False)
ops["per_layer_routing"] = dict(per_layer.ops)
del basis
report["ops"] = ops
save_file(outputs, args["out"])

# -- memory, part 2: offload ---------------------------------------------------------------------
for name in ("a0", "a1", "b0"):
    m4.offload(name)
for name in ("a0", "a1", "b0"):
    offloaded = m2.offload(name)
    memory["steps"].append({"offload": name, "offloaded": offloaded, **state(),
                            "download_again": {n: download(n) for n in ("a0", "a1", "b0")}})
report["memory"] = memory
print(json.dumps(report))
