"""Token routing for the per-cluster GEMMs: which tokens go to which basis, without a device sync."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """Tokens grouped by cluster, computed on the tokens' device with no host sync.

    token_cluster: [T] int32, c(t) or -1 (no adapter).
    order: [T] int32, token ids sorted by cluster (stable); tokens without adapter come first.
    cluster_start: [C + 1] int32; cluster c's tokens are ``order[cluster_start[c]:cluster_start[c+1]]``.
    num_clusters: C.
    """

    token_cluster: torch.Tensor
    order: torch.Tensor
    cluster_start: torch.Tensor
    num_clusters: int


def route_tokens(
    adapter_index: torch.Tensor,
    cluster_of_adapter: torch.Tensor | None,
    num_clusters: int,
) -> Routing:
    """Semantics: group tokens by c(t) = cluster_of_adapter[adapter_index[t]] (-1 where adapter_index[t] == -1).

    adapter_index: [T] int32/int64 in [-1, N).  cluster_of_adapter: [N] int in [0, C) or None (all 0).
    num_clusters: C.  Returns a new ``Routing``; nothing is modified.  No device sync.
    """
    idx = adapter_index.long()
    if cluster_of_adapter is None:
        tc = torch.where(idx >= 0, 0, -1)
    else:
        tc = torch.where(idx >= 0, cluster_of_adapter.long()[idx.clamp_min(0)], -1)
    order = torch.argsort(tc, stable=True)
    sorted_tc = tc[order]
    probes = torch.arange(num_clusters + 1, device=tc.device, dtype=sorted_tc.dtype)
    # cluster_start[c] = first position whose cluster is >= c; cluster_start[C] = T.
    cluster_start = torch.searchsorted(sorted_tc, probes)
    return Routing(
        token_cluster=tc.to(torch.int32),
        order=order.to(torch.int32),
        cluster_start=cluster_start.to(torch.int32),
        num_clusters=num_clusters,
    )


def identity_routing(num_tokens: int, device: torch.device | str) -> Routing:
    """Semantics: every token in cluster 0, in its own order (one basis: no sort, no search).

    For C == 1 in place of ``route_tokens``: the GEMMs then also run over tokens without an
    adapter, which is exact because their core product is zero (the core multiply writes g[t] = 0
    for index -1), so expand adds exactly 0 to their rows. Three small device ops, no host sync
    (CUDA-graph capturable). Returns a new ``Routing`` with token_cluster all 0.
    """
    order = torch.arange(num_tokens, dtype=torch.int32, device=device)
    # [0, T] without a host-to-device copy (capturable); T == 0 gives [0, 0].
    cluster_start = torch.arange(2, dtype=torch.int32, device=device) * num_tokens
    return Routing(
        token_cluster=torch.zeros(num_tokens, dtype=torch.int32, device=device),
        order=order,
        cluster_start=cluster_start,
        num_clusters=1,
    )


def segments_from_index(adapter_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: run-length encode adapter_index into segments of equal consecutive values.

    adapter_index: [T] int (typically sorted by adapter, e.g. a prefill batch where each request's
    tokens are contiguous).  Returns (seg_start [num_seg + 1] int32, seg_adapter [num_seg] int32),
    new tensors on the same device.  Reads the number of segments: one device sync.
    """
    if adapter_index.numel() == 0:
        z = torch.zeros(1, dtype=torch.int32, device=adapter_index.device)
        return z, z[:0]
    values, counts = torch.unique_consecutive(adapter_index, return_counts=True)
    seg_start = torch.zeros(values.numel() + 1, dtype=torch.int64, device=adapter_index.device)
    seg_start[1:] = torch.cumsum(counts, 0)
    return seg_start.to(torch.int32), values.to(torch.int32)
