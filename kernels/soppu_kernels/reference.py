"""Pure-torch fp32 references: the oracle every kernel is tested against.

Written for clarity, not speed: every op computes in float32 on whatever device its inputs
live on, groups tokens by adapter with boolean masks, and adds the result into ``y`` once,
rounding to ``y``'s dtype a single time (the kernels round the same way).

Index conventions shared by every op in this package:

* ``adapter_index[t] == -1`` means token ``t`` has no adapter: its row of ``y`` is untouched.
* ``cluster_of_adapter[a]`` is the cluster (basis) of adapter ``a``; ``None`` means "all zero".
* Unlike torch indexing, ``-1`` is never "the last adapter". The references check index
  ranges (and raise ``ValueError``); the kernels do not (out-of-range is undefined behaviour).
"""

from __future__ import annotations

import torch

from ._validate import check_core_mv, check_dense_lora, check_routing_indices, check_shared_basis

__all__ = [
    "core_gather_mv_ref",
    "core_segment_mv_ref",
    "dense_lora_ref",
    "expand_ref",
    "shared_basis_lora_ref",
    "shrink_ref",
    "token_clusters_ref",
]


def _as_matrix(core: torch.Tensor, diag: bool) -> torch.Tensor:
    """One adapter's core as a k x k float32 matrix (diag: a vector of k becomes diag(s))."""
    core = core.float()
    return torch.diag(core) if diag else core


def token_clusters_ref(
    adapter_index: torch.Tensor, cluster_of_adapter: torch.Tensor | None
) -> torch.Tensor:
    """Semantics: c[t] = cluster_of_adapter[adapter_index[t]], or -1 where adapter_index[t] == -1.

    adapter_index: [T] int32/int64 in [-1, N).  cluster_of_adapter: [N] int or None (all 0).
    Returns a new int64 tensor [T]; nothing is modified.
    """
    idx = adapter_index.long()
    if cluster_of_adapter is None:
        return torch.where(idx >= 0, 0, -1)
    return torch.where(idx >= 0, cluster_of_adapter.long()[idx.clamp_min(0)], -1)


def shared_basis_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    adapter_index: torch.Tensor,
    cluster_of_adapter: torch.Tensor | None = None,
    *,
    diag: bool,
) -> torch.Tensor:
    """Semantics: y[t] += U[c] @ (S[a] @ (V[c].T @ x[t])) for a = adapter_index[t] >= 0, c = cluster_of_adapter[a].

    y: [T, d_out] float (modified in place and returned).  x: [T, d_in], same dtype as y.
    U: [C, d_out, k], V: [C, d_in, k] float.  S: [N, k, k] (``diag=False``) or [N, k] (``diag=True``).
    adapter_index: [T] int32/int64 in [-1, N).  cluster_of_adapter: [N] int in [0, C), or None.
    Computed in float32; y is rounded to its dtype once.
    """
    check_shared_basis(y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag)
    check_routing_indices(adapter_index, cluster_of_adapter, S.shape[0], U.shape[0])
    idx = adapter_index.long()
    delta = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    for a in torch.unique(idx[idx >= 0]).tolist():
        rows = idx == a
        c = 0 if cluster_of_adapter is None else int(cluster_of_adapter[a])
        h = x[rows].float() @ V[c].float()  # [t_a, k] = (V_c.T @ x_t) for each row
        g = h @ _as_matrix(S[a], diag).T  # S_a @ h_t
        delta[rows] = g @ U[c].float().T  # U_c @ g_t
    y.copy_((y.float() + delta).to(y.dtype))
    return y


def shrink_ref(
    x: torch.Tensor, V: torch.Tensor, token_cluster: torch.Tensor
) -> torch.Tensor:
    """Semantics: h[t] = V[c[t]].T @ x[t], and h[t] = 0 where c[t] == -1.

    x: [T, d_in] float.  V: [C, d_in, k] float.  token_cluster: [T] int in [-1, C).
    Returns a new float32 tensor [T, k]; nothing is modified.
    """
    c_of_t = token_cluster.long()
    h = torch.zeros(x.shape[0], V.shape[2], dtype=torch.float32, device=x.device)
    for c in range(V.shape[0]):
        rows = c_of_t == c
        h[rows] = x[rows].float() @ V[c].float()
    return h


def core_gather_mv_ref(
    h: torch.Tensor, S: torch.Tensor, adapter_index: torch.Tensor, *, diag: bool
) -> torch.Tensor:
    """Semantics: g[t] = S[a] @ h[t] (diag: S[a] * h[t]) for a = adapter_index[t] >= 0; g[t] = 0 where a == -1.

    h: [T, k] float.  S: [N, k, k] (full) or [N, k] (diag), any float dtype.
    adapter_index: [T] int32/int64 in [-1, N).  Returns a new float32 tensor [T, k].
    """
    check_core_mv(h, S, diag=diag)
    check_routing_indices(adapter_index, None, S.shape[0], 1)
    idx = adapter_index.long()
    g = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for t in range(h.shape[0]):
        a = int(idx[t])
        if a >= 0:
            g[t] = _as_matrix(S[a], diag) @ h[t].float()
    return g


def core_segment_mv_ref(
    h: torch.Tensor,
    S: torch.Tensor,
    seg_start: torch.Tensor,
    seg_adapter: torch.Tensor,
    *,
    diag: bool,
) -> torch.Tensor:
    """Semantics: g[s[i]:s[i+1]] = h[s[i]:s[i+1]] @ S[seg_adapter[i]].T (diag: * S[seg_adapter[i]]); other rows 0.

    Rows are zero where seg_adapter[i] == -1 or outside every segment.

    h: [T, k] float.  S: [N, k, k] or [N, k].  seg_start: [num_seg + 1] int, non-decreasing,
    within [0, T].  seg_adapter: [num_seg] int in [-1, N).  Returns a new float32 tensor [T, k].
    """
    check_core_mv(h, S, diag=diag)
    starts = seg_start.long().tolist()
    g = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for i, a in enumerate(seg_adapter.long().tolist()):
        if a < -1 or a >= S.shape[0]:
            raise ValueError(f"`seg_adapter[{i}]` is {a}, outside [-1, {S.shape[0]})")
        lo, hi = starts[i], starts[i + 1]
        if a >= 0:
            g[lo:hi] = h[lo:hi].float() @ _as_matrix(S[a], diag).T
    return g


def expand_ref(
    y: torch.Tensor, g: torch.Tensor, U: torch.Tensor, token_cluster: torch.Tensor
) -> torch.Tensor:
    """Semantics: y[t] += U[c[t]] @ g[t] for c[t] >= 0; rows with c[t] == -1 are untouched.

    y: [T, d_out] float (modified in place and returned).  g: [T, k] float.
    U: [C, d_out, k] float.  token_cluster: [T] int in [-1, C).
    """
    c_of_t = token_cluster.long()
    delta = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    for c in range(U.shape[0]):
        rows = c_of_t == c
        delta[rows] = g[rows].float() @ U[c].float().T
    y.copy_((y.float() + delta).to(y.dtype))
    return y


def dense_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """Semantics: y[t] += B[a] @ (A[a] @ x[t]) for a = adapter_index[t] >= 0 (uncompressed LoRAs, gathered per token).

    y: [T, d_out] float (modified in place and returned).  x: [T, d_in].
    A: [N, r, d_in] (PEFT lora_A), B: [N, d_out, r] (PEFT lora_B, scaling folded in).
    adapter_index: [T] int32/int64 in [-1, N).
    """
    check_dense_lora(y, x, A, B, adapter_index)
    check_routing_indices(adapter_index, None, A.shape[0], 1)
    idx = adapter_index.long()
    delta = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    for a in torch.unique(idx[idx >= 0]).tolist():
        rows = idx == a
        delta[rows] = (x[rows].float() @ A[a].float().T) @ B[a].float().T
    y.copy_((y.float() + delta).to(y.dtype))
    return y
