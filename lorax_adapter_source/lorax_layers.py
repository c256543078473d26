"""LoRAX's side of compressed mode: adapter type ``soppu`` as LoRAX config / weights / batch classes.

Imports ``lorax_server`` at the top (as peft's ``tuners/lora/bnb.py`` imports bitsandbytes): import
this module only inside LoRAX. Patch 0005 calls :func:`load_lorax_config`; the classes below are
then LoRAX's own objects for a compressed adapter, and patch 0006 calls ``BatchSoppuWeights.add_to``
from ``forward_layer_type``. The engine-neutral parts (residency registry, the op, byte counting)
are in :mod:`lorax_adapter_source.compressed`; the on-disk form and its reader in
:mod:`soppu_client.format.compressed_form`.

Sharding follows LoRA: V like lora_A (column-parallel: split on k, all-gathered after the shrink;
row-parallel: split on d_in, all-reduced), U like lora_B (split on d_out), through LoRAX's own
``shard_lora_weights`` and ``collect_lora_a``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lorax_server.adapters.config import AdapterConfig
from lorax_server.adapters.weights import AdapterWeights, BatchAdapterWeights
from lorax_server.utils.lora import LM_HEAD
from lorax_server.utils.weights import load_module_weight
from soppu_kernels import Routing, identity_routing, pad_rank, route_tokens

from lorax_adapter_source.compressed import (
    ADAPTER_TYPE,
    REGISTRY,
    BasisRegistry,
    CoreTable,
    ResidentBasis,
    apply_compressed,
)
from soppu_client.format.compressed_form import (
    CompressedAdapterError,
    check_compressed_file,
    read_compressed_config,
)

__all__ = ["BatchSoppuWeights", "SoppuCompressedConfig", "SoppuCompressedWeights", "load_lorax_config"]


def load_lorax_config(adapter_config_path: str | Path | None) -> SoppuCompressedConfig | None:
    """Called by patched ``load_adapter_config``: a ``SoppuCompressedConfig``, or None when not ours."""
    if adapter_config_path is None:
        return None
    config = read_compressed_config(adapter_config_path)
    if config is None:
        return None
    return SoppuCompressedConfig.from_dict(config)


@dataclass
class SoppuCompressedConfig(AdapterConfig):
    """LoRAX's config of one compressed adapter (``meta``: its adapter_config.json as read)."""

    adapter_dir: str
    rank: int
    method: str
    target_modules: Any
    meta: dict

    @classmethod
    def from_dict(cls, config: dict) -> SoppuCompressedConfig:
        return cls(base_model_name_or_path=config["base_model_name_or_path"], adapter_dir=config["_dir"],
                   rank=int(config["rank"]), method=config["method"],
                   target_modules=config.get("target_modules"), meta=config)

    @property
    def r(self) -> int:  # read by LoRAX code that logs / sizes ranks
        return self.rank

    def map_weights_for_model(self, adapter_weights: dict, weight_names: tuple):
        module_map, used = {}, set()
        for name in weight_names:
            keys = {"U": f"{name}.U", "V": f"{name}.V", "S": f"{name}.S"}
            if not all(k in adapter_weights for k in keys.values()):
                continue
            module_map[name] = {part: (adapter_weights[key], key) for part, key in keys.items()}
            used.update(keys.values())
        return module_map, used

    def load_batched_adapter_weights(self, model, module_map, layer_type, unused_weight_names, dynamic):
        return SoppuCompressedWeights.load(self, model, module_map, layer_type, unused_weight_names)


class SoppuCompressedWeights(AdapterWeights):
    """One adapter's cores for one layer type: a slot in its cluster's ``CoreTable`` (the cores,
    [n_layers, k, k] or [n_layers, k] float32, are copied in once, at load), and a strong reference
    to the cluster's ResidentBasis (shared). Dropping the object (LoRAX's offload removes it from
    its ``LayerAdapterWeights``) frees the slot and credits the basis in the registry with its last user.
    """

    def __init__(self, basis: ResidentBasis, slot: int, nbytes: int, diag: bool, config: SoppuCompressedConfig,
                 registry: BasisRegistry = REGISTRY):
        self.basis = basis
        self.slot = slot
        self.diag = diag
        self.adapter_config = config
        self._nbytes = nbytes
        registry.charge(basis.digest, int(config.meta["basis"]["size"]))
        weakref.finalize(self, _release, basis.table, slot, registry, basis.digest)

    @classmethod
    def get_batch_types(cls):
        return [BatchSoppuWeights]

    @property
    def nbytes(self) -> int:
        """Bytes of this adapter's cores on the device (the shared basis is not counted here)."""
        return self._nbytes

    @classmethod
    def load(cls, config, model, module_map, layer_type, unused_weight_names, registry: BasisRegistry = REGISTRY):
        nlayers = model.get_num_layers_for_type(layer_type)
        layer_ids = list(range(nlayers)) if isinstance(nlayers, int) else list(nlayers)
        entries, names = [], []
        for layer_id in layer_ids:
            weight_name, layer = model.target_to_layer[(layer_id, layer_type)]
            if weight_name not in module_map:
                return None  # the adapter does not target this layer type
            entries.append(module_map[weight_name])
            names.append(weight_name)
        device = model.target_to_layer[(layer_ids[0], layer_type)][1].base_layer.linear.weight.device
        pg = model.process_group
        world, rank = pg.size(), pg.rank()
        row = bool(model.is_row_parallel(layer_type))
        digest = config.meta["basis"]["sha256"]
        key = (digest, layer_type, str(device), str(model.dtype), world, rank, row, tuple(layer_ids))

        diag = config.method == "diag"
        # per-module k (mixed-rank bundles): every layer of this type padded with zeros to the largest (exact)
        ranks = config.meta.get("ranks") or {}
        k_max = max(int(ranks.get(weight_name, config.rank)) for weight_name in names)

        def load_basis() -> ResidentBasis:
            check_compressed_file(Path(config.adapter_dir), config.meta["basis"])
            vs, uts = [], []
            for e in entries:
                V = load_module_weight(e["V"][1], e["V"][0], device, model.dtype)  # [d_in, k]  ~ lora_A
                U = load_module_weight(e["U"][1], e["U"][0], device, model.dtype)  # [d_out, k]
                U, V = pad_rank(U, k_max), pad_rank(V, k_max)
                vs.append(V)
                uts.append(U.T.contiguous())  # [k, d_out]  ~ lora_B
            if world > 1 and not row and vs[0].shape[1] % world:
                raise CompressedAdapterError(
                    f"compressed adapter {config.adapter_dir}: rank {vs[0].shape[1]} is not divisible by "
                    f"the tensor-parallel world size {world}")
            vs, uts = model.shard_lora_weights(vs, uts, layer_type)
            return ResidentBasis(digest=digest, layer_type=layer_type,
                                 V=torch.stack([v.contiguous() for v in vs]),
                                 U=torch.stack([u.T.contiguous() for u in uts]))

        basis = registry.get_or_load(key, load_basis)
        cores = torch.stack([pad_rank(load_module_weight(e["S"][1], e["S"][0], device, torch.float32), k_max,
                                      axes=1 if diag else 2) for e in entries])
        slot = basis.core_table(tuple(cores.shape[1:])).add(cores)  # stacked once, here, not per step
        for e in entries:
            for _tensor, name in e.values():
                unused_weight_names.discard(name)
        return cls(basis, slot, cores.numel() * cores.element_size(), config.method == "diag", config, registry)


def _release(table: CoreTable, slot: int, registry: BasisRegistry, digest: str) -> None:
    table.remove(slot)
    registry.credit(digest)


class _StepIndex:
    """One batch's token -> slot index for one core-table layout, and its routing (made on first use).

    Built once per step and shared by every layer and layer type with the same layout (LoRAX's
    adapter indices are the same for all of them).
    """

    def __init__(self, index: torch.Tensor, one_basis: bool):
        self.index = index  # [T] int64 in [-1, capacity)
        self._one_basis = one_basis
        self._routing: Routing | None = None

    def routing(self) -> Routing:
        """For the shrink / expand GEMMs: identity at one basis (exact: rows with index -1 get a zero
        core product), else this basis' tokens grouped (``route_tokens``)."""
        if self._routing is None:
            if self._one_basis:
                self._routing = identity_routing(self.index.shape[0], self.index.device)
            else:
                self._routing = route_tokens(self.index, None, 1)
        return self._routing


class _StepMemo:
    """The ``_StepIndex`` of the current step, per (slot lookup table, one basis?, head indices).

    A step is one ``meta.adapter_indices`` tensor (LoRAX builds a new one when the batch changes and
    never writes into it), so a new tensor starts a new memo and a decode batch that does not change
    reuses it.
    """

    def __init__(self) -> None:
        self._indices: torch.Tensor | None = None
        self._entries: dict[tuple, tuple[torch.Tensor | None, _StepIndex]] = {}

    def get(self, indices: torch.Tensor, head: torch.Tensor | None, lut: tuple[int, ...], one_basis: bool) -> _StepIndex:
        if self._indices is not indices:
            self._indices, self._entries = indices, {}
        key = (lut, one_basis, None if head is None else id(head))
        hit = self._entries.get(key)
        if hit is not None and hit[0] is head:
            return hit[1]
        tokens = indices if head is None else indices[head]
        lut_t = torch.tensor(lut, dtype=torch.int64).to(tokens.device, non_blocking=True)
        step = _StepIndex(lut_t[tokens], one_basis)  # the lut's last entry is -1: index -1 maps to -1
        self._entries[key] = (head, step)
        return step


_STEP = _StepMemo()


@dataclass
class _Group:
    basis: ResidentBasis
    table: CoreTable
    step: _StepIndex
    diag: bool


class BatchSoppuWeights(BatchAdapterWeights):
    """The batch's compressed adapters for one layer type, grouped by resident basis."""

    def __init__(self, groups: list[_Group], adapters: set[int], layer_name: str):
        self.groups = groups
        self.adapters = adapters
        self.layer_name = layer_name

    def has_adapter(self, adapter_index: int) -> bool:
        return adapter_index in self.adapters

    @classmethod
    def key(cls) -> str:
        return ADAPTER_TYPE

    @classmethod
    def load(cls, adapter_weights, meta, layer_name, prefill, prefill_head_indices):
        """Host-side grouping; the token index per group comes from the step memo (device work once per step)."""
        ours = {i: w for i, w in adapter_weights.items()
                if isinstance(w, SoppuCompressedWeights) and i in meta.adapter_set}
        if not ours:
            return None
        head = prefill_head_indices if prefill_head_indices is not None and layer_name == LM_HEAD else None
        by_basis: dict[int, list[int]] = {}
        for i in sorted(ours):
            by_basis.setdefault(id(ours[i].basis), []).append(i)
        size = max(max(ours), max(meta.adapter_set)) + 1  # from the host-side set: no device sync
        one_basis = len(by_basis) == 1
        groups = []
        for members in by_basis.values():
            first = ours[members[0]]
            lut = [-1] * (size + 1)
            for i in members:
                lut[i] = ours[i].slot
            step = _STEP.get(meta.adapter_indices, head, tuple(lut), one_basis)
            groups.append(_Group(first.basis, first.basis.table, step, first.diag))
        return cls(groups, set(ours), layer_name)

    def add_to(self, layer, result: torch.Tensor, input: torch.Tensor, start_idx: int, end_idx: int) -> torch.Tensor:
        """``result[:, start_idx:end_idx] += `` the compressed adapters' deltas for ``layer``."""
        layer_id = layer.layer_id
        collect = layer.collect_lora_a if layer.process_group.size() > 1 else None
        y = result[:, start_idx:end_idx]
        for g in self.groups:
            apply_compressed(y, input, g.basis.U[layer_id], g.basis.V[layer_id], g.table.cores[layer_id],
                             g.step.index, diag=g.diag, collect=collect, routing=g.step.routing)
        return result
