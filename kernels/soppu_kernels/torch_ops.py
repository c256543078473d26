"""Vectorized torch ops: the shared-basis op as a few dense batch ops, for CPU serving.

The references in :mod:`soppu_kernels.reference` loop over adapters and tokens in Python (they are
the oracle, written for clarity). This module computes the same semantics with no Python loop over
tokens or adapters and no host sync, so it is fit for a serving hot path on CPU (and runs on any
device):

* ``h_all = x @ [V_0 | ... | V_{C-1}]``: one GEMM for every basis of the batch (one V_c^T x per
  cluster basis for the whole batch);
* each token takes its own cluster's block of ``h_all`` (a gather) and multiplies it by its
  adapter's core ``S[a(t)]`` (one batched k x k matvec, gathered by adapter index);
* the products are scattered into their cluster's block and ``y += G @ [U_0 | ... | U_{C-1}]^T``:
  one GEMM for every basis.

At C == 1 the gather and scatter are skipped. Accumulation is float32; ``y`` is rounded to its
dtype once, as in the reference. Tokens with ``adapter_index == -1`` get exactly zero added.
"""

from __future__ import annotations

import torch

from ._validate import check_shared_basis

__all__ = ["shared_basis_lora_torch"]


def shared_basis_lora_torch(
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

    y: [T, d_out] float (modified in place and returned; may be a column slice of a larger tensor).
    x: [T, d_in].  U: [C, d_out, k], V: [C, d_in, k].  S: [N, k, k] (``diag=False``) or [N, k].
    adapter_index: [T] int32/int64 in [-1, N) (not range-checked: no host sync).
    cluster_of_adapter: [N] int in [0, C), or None (all 0).  Computed in float32.
    """
    check_shared_basis(y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag)
    T = x.shape[0]
    C, d_out, k = U.shape
    if T == 0:
        return y
    idx = adapter_index.long()
    valid = (idx >= 0).unsqueeze(1)
    a = idx.clamp_min(0)
    xf = x.float()
    if C == 1:
        h = xf @ V[0].float()  # [T, k]
    else:
        h_all = (xf @ V.float().permute(1, 0, 2).reshape(V.shape[1], C * k)).view(T, C, k)
        c = cluster_of_adapter.long()[a] if cluster_of_adapter is not None else torch.zeros_like(a)
        pick = c.view(T, 1, 1).expand(T, 1, k)
        h = h_all.gather(1, pick).squeeze(1)
    core = S[a].float()
    if diag:
        g = core * h
    else:
        g = torch.bmm(core, h.unsqueeze(2)).squeeze(2)
    g = torch.where(valid, g, torch.zeros((), dtype=g.dtype, device=g.device))
    if C == 1:
        delta = g @ U[0].float().T
    else:
        G = torch.zeros((T, C, k), dtype=g.dtype, device=g.device).scatter_(1, pick, g.unsqueeze(1))
        delta = G.view(T, C * k) @ U.float().permute(1, 0, 2).reshape(d_out, C * k).T
    if y.dtype == torch.float32:
        y.add_(delta)
    else:
        y.copy_((y.float() + delta).to(y.dtype))
    return y
