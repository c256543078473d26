"""Runs under LORAX_PYTHON with a patched ``lorax_server`` (0001-0008), this repo and kernels/ on PYTHONPATH.

Drives LoRAX's own code on SOPPU compressed adapters (local dirs, or ``owner/name`` ids of source
``soppu`` with SOPPU_SERVE_FORMAT=compressed): download_adapter_weights (bytes
moved), load_module_map -> load_adapter_config (patch 0005) -> SoppuCompressedConfig,
load_batched_adapter_weights, LayerAdapterWeights, AdapterBatchData.from_meta (a prefill batch), and
TensorParallelMultiAdapterLinear.forward -> forward_layer_type (patch 0006) on CPU. Writes the layer
outputs to a safetensors file and prints one JSON report line.

argv[1]: JSON {"adapters": [dir or id, ...], "source": "local"|"soppu", "model_id", "n_layers",
               "token_adapter": [...], "inputs", "out"}
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file

args = json.loads(sys.argv[1])

from lorax_server.adapters.utils import download_adapter_weights  # noqa: E402
from lorax_server.adapters.weights import AdapterBatchData, AdapterBatchMetadata, LayerAdapterWeights  # noqa: E402
from lorax_server.utils.adapter import load_module_map  # noqa: E402

from lorax_adapter_source import compressed as lc  # noqa: E402
from tests.lorax.lorax_cpu_model import build_cpu_model  # noqa: E402

n_layers = int(args["n_layers"])
layer_types = ("q_proj", "v_proj")
weight_names = tuple(f"model.layers.{i}.self_attn.{t}" for i in range(n_layers) for t in layer_types)


inputs = load_file(args["inputs"])
model = build_cpu_model(inputs, n_layers, layer_types)
layers = model.target_to_layer

source = args.get("source", "local")
report = {"bytes": [], "types": [], "unused": [], "adapter_dirs": []}
weights = {t: LayerAdapterWeights() for t in layer_types}
per_adapter = []
for j, adapter_dir in enumerate(args["adapters"]):
    adapter_index = j + 1  # 0: the base model
    report["bytes"].append(download_adapter_weights(adapter_dir, source))  # before this adapter is loaded
    module_map, config, used, _tok = load_module_map(args["model_id"], adapter_dir, source, weight_names, None)
    report["adapter_dirs"].append(config.adapter_dir)
    report["types"].append(type(config).__name__)
    unused = set(used)
    loaded = {}
    for t in layer_types:
        w = config.load_batched_adapter_weights(model, module_map, t, unused, True)
        assert w is not None, f"no weights for {t}"
        weights[t].add_adapter(adapter_index, w)
        loaded[t] = w
    report["unused"].append(sorted(unused))
    per_adapter.append(loaded)

report["registry_loads"] = lc.REGISTRY.loads
report["shared_basis"] = {t: [per_adapter[0][t].basis is per_adapter[j][t].basis for j in range(len(per_adapter))]
                          for t in layer_types}
report["core_bytes"] = [per_adapter[j]["q_proj"].nbytes for j in range(len(per_adapter))]
report["resident_bytes"] = sum(b.nbytes for b in lc.REGISTRY.resident())

token_adapter = [a + 1 if a >= 0 else 0 for a in args["token_adapter"]]
segments, seg_idx = [0], []
for pos, a in enumerate(token_adapter):
    if pos == 0 or a != token_adapter[pos - 1]:
        if pos:
            segments.append(pos)
        seg_idx.append(a)
segments.append(len(token_adapter))
meta = AdapterBatchMetadata(
    adapter_indices=torch.tensor(token_adapter, dtype=torch.int64),
    adapter_list=token_adapter,
    adapter_set=set(token_adapter),
    adapter_segments=torch.tensor(segments, dtype=torch.int32),
    segment_indices=seg_idx,
)
data = AdapterBatchData.from_meta(meta, weights, {}, None, prefill=True, prefill_head_indices=None)
report["batch_types"] = {t: sorted(d) for t, d in data.data.items()}
report["groups"] = {t: len(d[lc.ADAPTER_TYPE].groups) for t, d in data.data.items()}

x = inputs["x"]
outputs = {}
for (i, t), (_, layer) in layers.items():
    with torch.no_grad():
        outputs[f"{i}.{t}"] = layer(x, data).contiguous()
save_file(outputs, args["out"])
print(json.dumps(report))
