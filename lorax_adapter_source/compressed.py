"""Compressed mode for LoRAX: adapter type ``soppu`` that keeps each cluster's basis once per layer.

A SOPPU bundle stores, per targeted weight matrix, one basis (U [d_out, k], V [d_in, k]) per
cluster and one core S_i ([k, k] or [k] for ``diag``) per adapter. In compressed mode LoRAX loads
a cluster's basis onto the device once per layer and shares it between every adapter of that
cluster; an adapter holds only its cores. Loading an adapter whose basis is already resident
moves only its cores. The layer forward applies, for every token t of adapter a(t),

    y[t] += U_c @ (S[a(t)] @ (V_c.T @ x[t]))

with ``soppu_kernels`` (``shrink`` = one GEMM per basis, ``core_gather_mv`` = per-token core,
``expand`` = one GEMM per basis; Triton on CUDA tensors, the pure-torch reference on CPU).

On-disk format (``soppu-compressed/1``, one directory per adapter): see
:mod:`soppu_client.format.compressed_form`, which writes it (``soppu export --format compressed``, the
``soppu`` source with ``SOPPU_SERVE_FORMAT=compressed``). ``basis.sha256`` in its config is the
digest of basis.safetensors, byte-identical for all adapters of one cluster of one bundle: it is
the residency key. The cores are applied as they are (the PEFT export of the same adapter is
r = k, lora_A = V.T, lora_B = U @ S, scaling 1).

LoRAX integration (patches 0005-0007 route to this module, they hold no logic):

* ``adapters/__init__.py`` ``load_adapter_config`` -> :func:`load_lorax_config` (None unless ours);
* ``utils/layers.py`` ``LoraLinear.forward_layer_type`` -> ``BatchSoppuWeights.add_to`` when the
  batch holds data of key ``"soppu"`` (``ADAPTER_TYPE``); LoRA adapters in the same batch still
  take LoRAX's own paths;
* ``adapters/utils.py`` ``download_adapter_weights`` -> :func:`compressed_weight_bytes`: the bytes
  the load will really move (cores, plus the basis only when it is not resident).

The LoRAX classes (``SoppuCompressedConfig`` / ``SoppuCompressedWeights`` / ``BatchSoppuWeights``,
subclasses of LoRAX's ``AdapterConfig`` / ``AdapterWeights`` / ``BatchAdapterWeights``) are built by
:func:`lorax_types` on first use inside LoRAX, so this module imports without LoRAX installed.
Sharding follows LoRA: V like lora_A (column-parallel: split on k, all-gathered after the shrink;
row-parallel: split on d_in, all-reduced), U like lora_B (split on d_out).
"""

from __future__ import annotations

import hmac
import json
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import torch

from soppu_client.format.compressed_form import (
    BASIS_FILE,
    CONFIG_FILE,
    CORES_FILE,
    FORMAT,
    PEFT_TYPE,
)
from soppu_client.format.fsutil import file_digest

ADAPTER_TYPE = "soppu"  # key of the batch data in LoRAX's AdapterBatchData.data[layer_type]

__all__ = [
    "ADAPTER_TYPE",
    "BASIS_FILE",
    "CONFIG_FILE",
    "CORES_FILE",
    "FORMAT",
    "PEFT_TYPE",
    "BasisRegistry",
    "ResidentBasis",
    "REGISTRY",
    "apply_compressed",
    "compressed_weight_bytes",
    "load_compressed",
    "load_lorax_config",
    "lorax_types",
    "read_compressed_config",
]


class CompressedAdapterError(ValueError):
    """A compressed adapter directory is malformed or does not match its config."""


# ---------------------------------------------------------------------------------------------
# Reading (both sides, no LoRAX)
# ---------------------------------------------------------------------------------------------
_REQUIRED = ("format", "base_model_name_or_path", "method", "rank", "modules", "basis", "cores")


def read_compressed_config(path: str | Path) -> dict | None:
    """The config of a compressed adapter (``path``: its dir or its adapter_config.json); None if not one.

    Raises CompressedAdapterError when the file says it is one but is malformed.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE:
        return None
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise CompressedAdapterError(f"{p}: compressed adapter config lacks {', '.join(missing)}")
    if config["format"] != FORMAT:
        raise CompressedAdapterError(f"{p}: format is {config['format']!r}, expected {FORMAT!r}")
    if config["method"] not in ("full", "diag"):
        raise CompressedAdapterError(f"{p}: method {config['method']!r} is not 'full' or 'diag'")
    config["_dir"] = str(p.parent)
    return config


def _check_file(adapter_dir: Path, entry: dict) -> Path:
    path = adapter_dir / entry["file"]
    if not path.is_file():
        raise CompressedAdapterError(f"compressed adapter {adapter_dir}: {entry['file']} is missing")
    digest, size = file_digest(path)
    if size != entry["size"] or not hmac.compare_digest(digest, str(entry["sha256"])):
        raise CompressedAdapterError(f"compressed adapter {adapter_dir}: {entry['file']} does not match its "
                                     f"size / sha256 in {CONFIG_FILE}")
    return path


def load_compressed(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, basis {"<module>.U"/".V"}, cores {"<module>.S"}) of a compressed adapter dir, digests checked."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = read_compressed_config(adapter_dir)
    if config is None:
        raise CompressedAdapterError(f"{adapter_dir} is not a SOPPU compressed adapter")
    basis = load_file(str(_check_file(adapter_dir, config["basis"])))
    cores = load_file(str(_check_file(adapter_dir, config["cores"])))
    return config, basis, cores


# ---------------------------------------------------------------------------------------------
# Basis residency: one copy per (basis digest, layer type, device, dtype, shard) in the process
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ResidentBasis:
    """A cluster's basis for one layer type, all layers stacked, on the serving device (sharded).

    V: [n_layers, d_in (shard), k (shard)], U: [n_layers, d_out (shard), k]. Adapters hold a
    strong reference; the registry holds a weak one, so the basis is freed with its last adapter.
    """

    digest: str
    layer_type: str
    V: torch.Tensor
    U: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.V.numel() * self.V.element_size() + self.U.numel() * self.U.element_size()


class BasisRegistry:
    """Process-wide map key -> ResidentBasis (weak values); ``get_or_load`` creates each basis once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: "weakref.WeakValueDictionary[tuple, ResidentBasis]" = weakref.WeakValueDictionary()
        self.loads = 0  # how many bases were created (for tests and logs)

    def get_or_load(self, key: tuple, loader: Callable[[], ResidentBasis]) -> ResidentBasis:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                return hit
            basis = loader()
            self._entries[key] = basis
            self.loads += 1
            return basis

    def is_resident(self, digest: str) -> bool:
        with self._lock:
            return any(k[0] == digest for k in list(self._entries.keys()))

    def resident(self) -> list[ResidentBasis]:
        with self._lock:
            return list(self._entries.values())


REGISTRY = BasisRegistry()


def compressed_weight_bytes(weight_files: Iterable[str | Path] | str | Path,
                            registry: BasisRegistry = REGISTRY) -> int | None:
    """Bytes a load of this compressed adapter moves: the cores, plus the basis unless resident.

    ``weight_files``: the adapter dir, or its weight files as a LoRAX source lists them.
    None when they are not a SOPPU compressed adapter (LoRAX then counts as usual).
    """
    if isinstance(weight_files, (str, Path)):
        dirs = {Path(weight_files)}
    else:
        dirs = {Path(f).parent for f in weight_files}
    if len(dirs) != 1:
        return None
    config = read_compressed_config(dirs.pop())
    if config is None:
        return None
    n = int(config["cores"]["size"])
    if not registry.is_resident(config["basis"]["sha256"]):
        n += int(config["basis"]["size"])
    return n


# ---------------------------------------------------------------------------------------------
# The op as LoRAX runs it for one layer
# ---------------------------------------------------------------------------------------------
def apply_compressed(y: torch.Tensor, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor,
                     index: torch.Tensor, *, diag: bool, collect: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """y[t] += U @ (S[index[t]] @ (V.T @ x[t])) for index[t] >= 0 (one basis; y modified in place).

    y: [T, d_out(shard)], x: [T, d_in(shard)], U: [d_out(shard), k], V: [d_in(shard), k(shard)],
    S: [N, k, k] or [N, k], index: [T] in [-1, N). ``collect`` joins the shards of V.T x across
    tensor-parallel ranks (LoRAX's ``collect_lora_a``), None on one rank.
    """
    import soppu_kernels as sk

    routing = sk.route_tokens(index, None, 1)
    h = sk.shrink(x, V.unsqueeze(0), routing, backend=backend)
    if collect is not None:
        h = collect(h)
    g = sk.core_gather_mv(h, S, index, diag=diag, backend=backend)
    return sk.expand(y, g, U.unsqueeze(0), routing, backend=backend)


# ---------------------------------------------------------------------------------------------
# LoRAX classes (built on first use, inside LoRAX)
# ---------------------------------------------------------------------------------------------
_TYPES: SimpleNamespace | None = None
_TYPES_LOCK = threading.Lock()


def load_lorax_config(adapter_config_path) -> Any | None:
    """Called by patched ``load_adapter_config``: a ``SoppuCompressedConfig`` or None (not ours)."""
    if adapter_config_path is None:
        return None
    config = read_compressed_config(adapter_config_path)
    if config is None:
        return None
    return lorax_types().SoppuCompressedConfig.from_dict(config)


def lorax_types() -> SimpleNamespace:
    """The LoRAX subclasses (needs ``lorax_server``); built once per process."""
    global _TYPES
    with _TYPES_LOCK:
        if _TYPES is None:
            _TYPES = _build_lorax_types()
        return _TYPES


def _build_lorax_types() -> SimpleNamespace:  # noqa: C901 - the three classes belong together
    from lorax_server.adapters.config import AdapterConfig
    from lorax_server.adapters.weights import AdapterWeights, BatchAdapterWeights
    from lorax_server.utils.lora import LM_HEAD

    @dataclass
    class SoppuCompressedConfig(AdapterConfig):
        adapter_dir: str
        rank: int
        method: str
        target_modules: Any
        meta: dict

        @classmethod
        def from_dict(cls, config: dict) -> "SoppuCompressedConfig":
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
        """One adapter's cores for one layer type ([n_layers, k, k] or [n_layers, k], float32) and a
        strong reference to its cluster's ResidentBasis (shared)."""

        def __init__(self, basis: ResidentBasis, cores: torch.Tensor, diag: bool, config: SoppuCompressedConfig):
            self.basis = basis
            self.cores = cores
            self.diag = diag
            self.adapter_config = config

        @classmethod
        def get_batch_types(cls):
            return [BatchSoppuWeights]

        @property
        def nbytes(self) -> int:
            return self.cores.numel() * self.cores.element_size()

        @classmethod
        def load(cls, config, model, module_map, layer_type, unused_weight_names, registry: BasisRegistry = REGISTRY):
            nlayers = model.get_num_layers_for_type(layer_type)
            layer_ids = list(range(nlayers)) if isinstance(nlayers, int) else list(nlayers)
            entries = []
            for layer_id in layer_ids:
                weight_name, layer = model.target_to_layer[(layer_id, layer_type)]
                if weight_name not in module_map:
                    return None  # the adapter does not target this layer type
                entries.append(module_map[weight_name])
            device = model.target_to_layer[(layer_ids[0], layer_type)][1].base_layer.linear.weight.device
            pg = model.process_group
            world, rank = pg.size(), pg.rank()
            row = bool(model.is_row_parallel(layer_type))
            digest = config.meta["basis"]["sha256"]
            key = (digest, layer_type, str(device), str(model.dtype), world, rank, row, tuple(layer_ids))

            def load_basis() -> ResidentBasis:
                from lorax_server.utils.weights import load_module_weight

                _check_file(Path(config.adapter_dir), config.meta["basis"])
                vs, uts = [], []
                for e in entries:
                    V = load_module_weight(e["V"][1], e["V"][0], device, model.dtype)  # [d_in, k]  ~ lora_A
                    U = load_module_weight(e["U"][1], e["U"][0], device, model.dtype)  # [d_out, k]
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
            from lorax_server.utils.weights import load_module_weight

            cores = torch.stack([load_module_weight(e["S"][1], e["S"][0], device, torch.float32) for e in entries])
            for e in entries:
                for _tensor, name in e.values():
                    unused_weight_names.discard(name)
            return cls(basis, cores.contiguous(), config.method == "diag", config)

    @dataclass
    class _Group:
        basis: ResidentBasis
        cores: torch.Tensor  # [n_layers, N, k, k] or [n_layers, N, k]
        index: torch.Tensor  # [T] in [-1, N)
        diag: bool

    class BatchSoppuWeights(BatchAdapterWeights):
        """The batch's compressed adapters for one layer type, grouped by resident basis."""

        def __init__(self, groups: list, adapters: set, layer_name: str):
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
            ours = {i: w for i, w in adapter_weights.items()
                    if isinstance(w, SoppuCompressedWeights) and i in meta.adapter_set}
            if not ours:
                return None
            indices = meta.adapter_indices
            if prefill_head_indices is not None and layer_name == LM_HEAD:
                indices = indices[prefill_head_indices]
            by_basis: dict[int, list] = {}
            for i in sorted(ours):
                by_basis.setdefault(id(ours[i].basis), []).append(i)
            lut_size = max(max(ours), max(meta.adapter_set)) + 1  # from the host-side set: no device sync
            groups = []
            for members in by_basis.values():
                first = ours[members[0]]
                lut = torch.full((lut_size,), -1, dtype=torch.int64)
                lut[members] = torch.arange(len(members), dtype=torch.int64)
                lut = lut.to(indices.device)
                index = torch.where(indices >= 0, lut[indices.clamp_min(0).long()], -1)
                cores = torch.stack([ours[i].cores for i in members], dim=1).contiguous()
                groups.append(_Group(first.basis, cores, index, first.diag))
            return cls(groups, set(ours), layer_name)

        def add_to(self, layer, result: torch.Tensor, input: torch.Tensor, start_idx: int, end_idx: int) -> torch.Tensor:
            """``result[:, start_idx:end_idx] += `` the compressed adapters' deltas for ``layer``."""
            layer_id = layer.layer_id
            collect = layer.collect_lora_a if layer.process_group.size() > 1 else None
            y = result[:, start_idx:end_idx]
            for g in self.groups:
                apply_compressed(y, input, g.basis.U[layer_id], g.basis.V[layer_id], g.cores[layer_id], g.index,
                                 diag=g.diag, collect=collect)
            return result

    return SimpleNamespace(SoppuCompressedConfig=SoppuCompressedConfig, SoppuCompressedWeights=SoppuCompressedWeights,
                           BatchSoppuWeights=BatchSoppuWeights)
