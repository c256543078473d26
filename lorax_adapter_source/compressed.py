"""Compressed mode for LoRAX, engine-neutral part: basis residency, the per-layer op, byte counting.

A SOPPU bundle stores, per targeted weight matrix, one basis (U [d_out, k], V [d_in, k]) per
cluster and one core S_i ([k, k] or [k] for ``diag``) per adapter. In compressed mode LoRAX loads
a cluster's basis onto the device once per layer and shares it between every adapter of that
cluster; an adapter holds only its cores. Loading an adapter whose basis is already resident
moves only its cores. The layer forward applies, for every token t of adapter a(t),

    y[t] += U_c @ (S[a(t)] @ (V_c.T @ x[t]))

with ``soppu_kernels`` (``shrink`` = one GEMM per basis, ``core_gather_mv`` = per-token core,
``expand`` = one GEMM per basis; Triton on CUDA tensors, the pure-torch reference on CPU).

The on-disk form (``soppu-compressed/1``) and its reader are :mod:`soppu_client.format.compressed_form`.
``basis.sha256`` in an adapter's config is the digest of its basis.safetensors, byte-identical for
all adapters of one cluster of one bundle: it is the residency key of :data:`REGISTRY`. The cores
are applied as they are (the PEFT export of the same adapter is r = k, lora_A = V.T, lora_B = U @ S,
scaling 1).

LoRAX integration (patches 0005-0008 hold no logic, they call):

* ``adapters/__init__.py`` ``load_adapter_config`` -> :func:`lorax_adapter_source.lorax_layers.load_lorax_config`;
* ``utils/layers.py`` ``forward_layer_type`` -> ``BatchSoppuWeights.add_to`` (in ``lorax_layers``)
  when the batch holds data of key ``"soppu"`` (:data:`ADAPTER_TYPE`); LoRA adapters in the same
  batch still take LoRAX's own paths;
* ``adapters/utils.py`` ``download_adapter_weights`` -> :func:`compressed_weight_bytes` (here): the
  bytes the load adds (cores, plus the basis only when no loaded adapter uses it: ``BasisRegistry.charge``);
* ``utils/graph.py`` ``GraphCache.can_use_graph`` -> :func:`refuses_graph` (here): batches with SOPPU
  data run eager (the graphs are traced with LoRA data only).

This module imports no LoRAX; :mod:`lorax_adapter_source.lorax_layers` holds the LoRAX classes.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from soppu_client.format.compressed_form import read_compressed_config

if TYPE_CHECKING:
    from soppu_kernels import Routing

ADAPTER_TYPE = "soppu"  # key of the batch data in LoRAX's AdapterBatchData.data[layer_type]

__all__ = ["ADAPTER_TYPE", "REGISTRY", "BasisRegistry", "CoreTable", "ResidentBasis", "apply_compressed",
           "compressed_weight_bytes", "refuses_graph"]


# ---------------------------------------------------------------------------------------------
# Basis residency: one copy per (basis digest, layer type, device, dtype, shard) in the process
# ---------------------------------------------------------------------------------------------
class CoreTable:
    """The cores of every loaded adapter of one resident basis (one layer type), on its device.

    ``cores``: [n_layers, capacity, k, k] (full) or [n_layers, capacity, k] (diag), float32. An
    adapter's cores are copied in once, when it loads (``add`` -> its slot), and its slot is freed
    when it unloads (``remove``); a decode step only gathers rows by slot. The table doubles its
    capacity when full (one copy, at a load), so read ``cores`` when you use it, do not keep it.
    """

    def __init__(self, n_layers: int, core_shape: tuple[int, ...], device: torch.device | str,
                 capacity: int = 4) -> None:
        self.core_shape = tuple(core_shape)
        self.cores = torch.zeros((n_layers, capacity, *self.core_shape), dtype=torch.float32, device=device)
        self._free = list(range(capacity - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def diag(self) -> bool:
        return len(self.core_shape) == 1

    def add(self, cores: torch.Tensor) -> int:
        """Copy one adapter's cores ([n_layers, *core_shape]) into a free slot; returns the slot."""
        if tuple(cores.shape) != (self.cores.shape[0], *self.core_shape):
            raise ValueError(f"`cores` has shape {tuple(cores.shape)}, the table holds "
                             f"{(self.cores.shape[0], *self.core_shape)} per adapter")
        with self._lock:
            if not self._free:
                n = self.cores.shape[1]
                grown = torch.zeros((self.cores.shape[0], 2 * n, *self.core_shape), dtype=self.cores.dtype,
                                    device=self.cores.device)
                grown[:, :n] = self.cores
                self.cores = grown
                self._free = list(range(2 * n - 1, n - 1, -1))
            slot = self._free.pop()
            self.cores[:, slot] = cores.to(device=self.cores.device, dtype=self.cores.dtype)
            return slot

    def remove(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)


@dataclass(eq=False)
class ResidentBasis:
    """A cluster's basis for one layer type, all layers stacked, on the serving device (sharded).

    V: [n_layers, d_in (shard), k (shard)], U: [n_layers, d_out (shard), k]; ``table``: the cores of
    the adapters loaded on it (``CoreTable``, made with the first one). Adapters hold a strong
    reference; the registry holds a weak one, so the basis is freed with its last adapter.
    """

    digest: str
    layer_type: str
    V: torch.Tensor
    U: torch.Tensor
    table: CoreTable | None = None

    @property
    def nbytes(self) -> int:
        return self.V.numel() * self.V.element_size() + self.U.numel() * self.U.element_size()

    def core_table(self, core_shape: tuple[int, ...]) -> CoreTable:
        """This basis' core table (made on first use); raises if ``core_shape`` differs from its cores'."""
        if self.table is None:
            self.table = CoreTable(self.U.shape[0], core_shape, self.U.device)
        elif self.table.core_shape != tuple(core_shape):
            raise ValueError(f"basis {self.digest} ({self.layer_type}) holds cores of shape {self.table.core_shape}, "
                             f"not {tuple(core_shape)}")
        return self.table


class BasisRegistry:
    """Process-wide map key -> ResidentBasis (weak values), and the bytes charged per basis digest.

    ``get_or_load`` creates each basis once. ``charge`` / ``credit`` count the users of a digest
    (one per loaded adapter weights object): a digest's bytes are charged when its first user
    loads and credited when its last one unloads, so a basis shared by many adapters counts once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: "weakref.WeakValueDictionary[tuple, ResidentBasis]" = weakref.WeakValueDictionary()
        self._users: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
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

    def charge(self, digest: str, nbytes: int) -> int:
        """One more user of basis ``digest`` (``nbytes``: its size); returns the bytes newly charged."""
        with self._lock:
            n = self._users.get(digest, 0)
            self._users[digest] = n + 1
            if n:
                return 0
            self._bytes[digest] = int(nbytes)
            return int(nbytes)

    def credit(self, digest: str) -> int:
        """One user of basis ``digest`` fewer; returns the bytes credited back (all, with its last user)."""
        with self._lock:
            n = self._users.get(digest, 0)
            if n > 1:
                self._users[digest] = n - 1
                return 0
            self._users.pop(digest, None)
            return self._bytes.pop(digest, 0)

    def is_charged(self, digest: str) -> bool:
        with self._lock:
            return digest in self._users

    def charged_bytes(self) -> int:
        """Bytes of every basis with at least one loaded user, each counted once."""
        with self._lock:
            return sum(self._bytes.values())

    def is_resident(self, digest: str) -> bool:
        with self._lock:
            return any(k[0] == digest for k in list(self._entries.keys()))

    def resident(self) -> list[ResidentBasis]:
        with self._lock:
            return list(self._entries.values())


REGISTRY = BasisRegistry()


def compressed_weight_bytes(weight_files: Iterable[str | Path] | str | Path,
                            registry: BasisRegistry = REGISTRY) -> int | None:
    """Bytes a load of this compressed adapter adds: the cores, plus the basis unless it is charged.

    ``weight_files``: the adapter dir, or its weight files as a LoRAX source lists them. The basis
    counts unless an adapter using it is loaded (``BasisRegistry.charge``), so it counts once
    however many adapters share it. None when they are not a SOPPU compressed adapter (LoRAX then
    counts as usual).
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
    if not registry.is_charged(config["basis"]["sha256"]):
        n += int(config["basis"]["size"])
    return n


def refuses_graph(adapter_data) -> bool:
    """True when a LoRAX ``AdapterBatchData`` holds SOPPU data: LoRAX's CUDA graphs are traced and
    refreshed with LoRA data only, so such a batch must run eager (patch 0008, ``can_use_graph``)."""
    return any(ADAPTER_TYPE in layer_data for layer_data in adapter_data.data.values())


# ---------------------------------------------------------------------------------------------
# The op as LoRAX runs it for one layer
# ---------------------------------------------------------------------------------------------
def apply_compressed(y: torch.Tensor, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor,
                     index: torch.Tensor, *, diag: bool, collect: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     backend: str = "auto", routing: Routing | Callable[[], Routing] | None = None) -> torch.Tensor:
    """y[t] += U @ (S[index[t]] @ (V.T @ x[t])) for index[t] >= 0 (one basis; y modified in place).

    y: [T, d_out(shard)], x: [T, d_in(shard)], U: [d_out(shard), k], V: [d_in(shard), k(shard)],
    S: [N, k, k] or [N, k], index: [T] in [-1, N). ``collect`` joins the shards of V.T x across
    tensor-parallel ranks (LoRAX's ``collect_lora_a``), None on one rank. ``routing``: the tokens'
    routing for the shrink / expand GEMMs, or a function that makes it (called only when the GEMM
    path runs), computed once per step by the caller; None routes here. Small batches on CUDA
    (T <= ``FUSED_MAX_TOKENS``, one rank) take the fused decode kernel, which needs no routing.
    """
    import soppu_kernels as sk

    if collect is None and backend in ("auto", "triton") and x.device.type == "cuda":
        from soppu_kernels import triton_ops

        if x.shape[0] <= triton_ops.FUSED_MAX_TOKENS:
            return triton_ops.shared_basis_lora_fused(y, x, U.unsqueeze(0), V.unsqueeze(0), S, index, None, diag=diag)
    if routing is None:
        routing = sk.route_tokens(index, None, 1)
    elif callable(routing):
        routing = routing()
    h = sk.shrink(x, V.unsqueeze(0), routing, backend=backend)
    if collect is not None:
        h = collect(h)
    g = sk.core_gather_mv(h, S, index, diag=diag, backend=backend)
    return sk.expand(y, g, U.unsqueeze(0), routing, backend=backend)
