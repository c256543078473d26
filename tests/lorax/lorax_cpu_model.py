"""Imported by the scripts run under LORAX_PYTHON (needs a patched ``lorax_server``): the stand-in
for a loaded LoRAX model on CPU, built from LoRAX's own layers.

``CpuModel`` holds only what adapter loading reads from a model (``target_to_layer``, ``dtype``,
``process_group``, layer counts, row-parallelism), with LoRAX's own ``Model.shard_lora_weights``.
"""

from __future__ import annotations

import torch
from lorax_server.layers.linear import get_linear
from lorax_server.layers.tensor_parallel import TensorParallelColumnLinear
from lorax_server.models.model import Model
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.layers import TensorParallelMultiAdapterLinear


class CpuModel:
    """What LoRAX's adapter loaders read from a loaded model; sharding is LoRAX's own method."""

    shard_lora_weights = Model.shard_lora_weights

    def __init__(self, layers: dict[tuple[int, str], tuple[str, torch.nn.Module]], n_layers: int):
        self.target_to_layer = layers
        self.n_layers = n_layers
        self.dtype = torch.float32
        self.world_size = 1
        self.process_group = FakeGroup(0, 1)

    def get_num_layers_for_type(self, layer_type: str) -> int:
        return self.n_layers

    def is_row_parallel(self, layer_type: str) -> bool:
        return False


def build_cpu_model(inputs: dict[str, torch.Tensor], n_layers: int, layer_types: tuple[str, ...]) -> CpuModel:
    """Column-parallel multi-adapter layers ``model.layers.<i>.self_attn.<t>`` over the base weights
    ``inputs["<i>.<t>.weight"]`` (one rank)."""
    pg = FakeGroup(0, 1)
    layers = {}
    for i in range(n_layers):
        for t in layer_types:
            base = TensorParallelColumnLinear(get_linear(inputs[f"{i}.{t}.weight"], bias=None, quantize=None))
            layers[(i, t)] = (f"model.layers.{i}.self_attn.{t}",
                              TensorParallelMultiAdapterLinear.load(base, i, [t], sizes=None, process_group=pg))
    return CpuModel(layers, n_layers)
