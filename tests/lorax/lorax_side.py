"""Runs under LORAX_PYTHON with a patched ``lorax_server`` and this repo on PYTHONPATH (CPU, DISABLE_SGMV=1).

Drives LoRAX's own code on a ``soppu`` adapter served by a loopback registry:
get_model_source / get_config_path / get_local_dir, the enum <-> string functions,
download_adapter_weights, load_adapter_config, load_module_map, then LoraWeights.load,
BatchLoraWeights (via AdapterBatchData.from_meta, a decode batch) and the pure-PyTorch
forward_lora path of TensorParallelMultiAdapterLinear. Writes the layer outputs to a safetensors file and prints one
JSON report line. The only non-LoRAX object is ``lorax_cpu_model.CpuModel``: what LoraWeights.load
reads from a loaded model, with LoRAX's own ``Model.shard_lora_weights``.

argv[1]: JSON {"adapter_id", "token", "model_id", "n_layers", "inputs": path, "out": path}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

args = json.loads(sys.argv[1])
adapter_id, token, model_id = args["adapter_id"], args["token"], args["model_id"]

from lorax_server.adapters import load_adapter_config  # noqa: E402
from lorax_server.adapters.lora import LoraWeights  # noqa: E402
from lorax_server.adapters.utils import download_adapter_weights  # noqa: E402
from lorax_server.adapters.weights import AdapterBatchData, AdapterBatchMetadata, LayerAdapterWeights  # noqa: E402
from lorax_server.pb import generate_pb2  # noqa: E402
from lorax_server.utils.adapter import (  # noqa: E402
    adapter_source_enum_to_string,
    enum_string_to_adapter_source,
    load_module_map,
)
from tests.lorax.lorax_cpu_model import build_cpu_model  # noqa: E402  (beside this script)
from lorax_server.utils.punica import has_sgmv  # noqa: E402
from lorax_server.utils.sources import get_config_path, get_local_dir, get_model_source  # noqa: E402

report: dict = {"has_sgmv": has_sgmv()}
report["enum"] = int(enum_string_to_adapter_source("soppu"))
report["enum_name"] = generate_pb2.AdapterSource.Name(generate_pb2.AdapterSource.SOPPU)
report["enum_back"] = adapter_source_enum_to_string(generate_pb2.AdapterSource.SOPPU)

source = get_model_source("soppu", adapter_id, extension=".safetensors", api_token=token)
report["source_class"] = f"{type(source).__module__}.{type(source).__name__}"
try:
    source.weight_files()
    report["cached_before"] = True
except FileNotFoundError:
    report["cached_before"] = False

report["weight_bytes"] = download_adapter_weights(adapter_id, "soppu", api_token=token)
report["weight_files"] = [str(p) for p in get_model_source("soppu", adapter_id, api_token=token).weight_files()]
config_path = Path(get_config_path(adapter_id, "soppu"))
report["config_path"] = str(config_path)
report["local_dir"] = str(get_local_dir(adapter_id, "soppu"))
config = load_adapter_config(None, config_path / "adapter_config.json", token)
report["config"] = {"type": type(config).__name__, "r": config.r, "lora_alpha": config.lora_alpha,
                    "target_modules": sorted(config.target_modules),
                    "base_model_name_or_path": config.base_model_name_or_path}

n_layers = int(args["n_layers"])
layer_types = ("q_proj", "v_proj")
weight_names = tuple(f"model.layers.{i}.self_attn.{t}" for i in range(n_layers) for t in layer_types)
module_map, adapter_config, used, _tokenizer = load_module_map(model_id, adapter_id, "soppu", weight_names, token)
report["module_map"] = sorted(module_map)


inputs = load_file(args["inputs"])
model = build_cpu_model(inputs, n_layers, layer_types)
layers = model.target_to_layer

x = inputs["x"]
n_tokens = x.shape[0]
n_adapter = int(inputs["n_adapter_tokens"].item())
adapter_index = 1  # LoRAX reserves index 0 for the base model
meta = AdapterBatchMetadata(
    adapter_indices=torch.tensor([adapter_index] * n_adapter + [0] * (n_tokens - n_adapter), dtype=torch.int64),
    adapter_list=[adapter_index, 0],
    adapter_set={adapter_index, 0},
    adapter_segments=torch.tensor([0, n_adapter, n_tokens], dtype=torch.int32),
    segment_indices=[adapter_index, 0],
)
weights = {}
for t in layer_types:
    lw = LayerAdapterWeights()
    lora = LoraWeights.load(adapter_config, model, module_map, t, set(used))
    assert lora is not None, f"no LoRA weights for {t}"
    lw.add_adapter(adapter_index, lora)
    weights[t] = lw

# A decode batch: BatchLoraWeights.load on a prefill batch sizes SGMV scratch space with the
# punica CUDA extension (get_tmp_tensors) even when SGMV is disabled, so CPU runs use decode.
outputs = {}
data = AdapterBatchData.from_meta(meta, weights, {}, None, prefill=False, prefill_head_indices=None)
report["batch_types"] = {t: sorted(d) for t, d in data.data.items()}
for (i, t), (_, layer) in layers.items():
    with torch.no_grad():
        outputs[f"{i}.{t}"] = layer(x, data).contiguous()
save_file(outputs, args["out"])
print(json.dumps(report))
