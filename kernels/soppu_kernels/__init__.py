"""soppu_kernels: apply shared-basis (compressed) LoRA adapters to a batch of tokens.

The op, per targeted weight matrix: for every token t with adapter a = adapter_index[t] (-1: none)
in cluster c = cluster_of_adapter[a],

    y[t] += U[c] @ (S[a] @ (V[c].T @ x[t]))          S[a]: k x k ("full") or diag(s_a) ("diag")

planned as one GEMM per cluster for h = x @ V[c] (``shrink``), a per-token core multiply gathered
by adapter index (``core_gather_mv``, BGMV-like; ``core_segment_mv``, SGMV-like, for prefill with
tokens contiguous per adapter), and one GEMM per cluster for y += g @ U[c].T (``expand``); a fused
single-launch kernel serves small decode batches. ``dense_lora`` is the uncompressed baseline.

Backends: "reference" (pure-torch fp32, the oracle: ``soppu_kernels.reference``), "torch"
(``shared_basis_lora`` only: the same op as a few vectorized batch ops, no Python loop and no host
sync, for CPU serving: ``soppu_kernels.torch_ops``), "triton"
(``soppu_kernels.triton_ops``; CUDA tensors, or CPU under TRITON_INTERPRET=1), "cuda" (cuBLAS
GEMMs + ``csrc/core_bgmv.cu`` built just in time; ``soppu_kernels.cuda_ops``), "auto" (triton on
CUDA tensors, reference otherwise). Triton is imported only when a Triton backend is used.

Errors: ValueError for bad shapes/dtypes/indices (naming the argument), RuntimeError for a backend
that cannot run here. Out-of-range indices are checked by the reference only.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import reference
from ._routing import Routing, identity_routing, route_tokens, segments_from_index
from ._shapes import pad_rank

__all__ = [
    "BACKENDS",
    "Routing",
    "core_gather_mv",
    "core_segment_mv",
    "dense_lora",
    "expand",
    "identity_routing",
    "pad_rank",
    "reference",
    "route_tokens",
    "segments_from_index",
    "shared_basis_lora",
    "shrink",
]

Backend = Literal["auto", "reference", "torch", "triton", "cuda"]
#: Backends each public op accepts (not every op has a "cuda" implementation).
BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton", "cuda")


def _resolve(backend: str, device: torch.device, op: str, available: tuple[str, ...]) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` {backend!r} not found. Available backends: {list(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend not in available:
        raise ValueError(f"{op} has no {backend!r} backend. Available: {list(available)}")
    return backend


def shared_basis_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    adapter_index: torch.Tensor,
    cluster_of_adapter: torch.Tensor | None = None,
    *,
    diag: bool,
    backend: Backend = "auto",
    path: Literal["auto", "gemm", "fused"] = "auto",
) -> torch.Tensor:
    """Semantics: y[t] += U[c] @ (S[a] @ (V[c].T @ x[t])) for a = adapter_index[t] >= 0, c = cluster_of_adapter[a].

    y: [T, d_out] fp16/bf16/fp32 (modified in place and returned; rows with a = -1 untouched).
    x: [T, d_in], U: [C, d_out, k], V: [C, d_in, k] (one dtype with y for triton/cuda).
    S: [N, k, k] (``diag=False``) or [N, k] (``diag=True``), any float dtype.
    adapter_index: [T] int32/int64 in [-1, N).  cluster_of_adapter: [N] int32/int64 in [0, C),
    or None when C == 1.  path (triton only): "gemm", "fused" (decode) or "auto".
    Accumulation is float32 in every backend.
    """
    b = _resolve(backend, x.device, "shared_basis_lora", ("reference", "torch", "triton", "cuda"))
    if b == "reference":
        return reference.shared_basis_lora_ref(
            y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag
        )
    if b == "torch":
        from .torch_ops import shared_basis_lora_torch

        return shared_basis_lora_torch(y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag)
    if b == "cuda":
        from . import cuda_ops

        return cuda_ops.shared_basis_lora(
            y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag
        )
    from . import triton_ops

    return triton_ops.shared_basis_lora(
        y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag, path=path
    )


def shrink(
    x: torch.Tensor, V: torch.Tensor, routing: Routing, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Semantics: h[t] = V[c(t)].T @ x[t] (one GEMM per cluster); h[t] = 0 where c(t) == -1.

    x: [T, d_in].  V: [C, d_in, k] (same dtype as x for triton).  routing: ``route_tokens(...)``.
    Returns a new float32 tensor h [T, k]; nothing is modified.
    """
    b = _resolve(backend, x.device, "shrink", ("reference", "triton"))
    if b == "reference":
        return reference.shrink_ref(x, V, routing.token_cluster)
    from . import triton_ops

    return triton_ops.shrink(x, V, routing)


def core_gather_mv(
    h: torch.Tensor,
    S: torch.Tensor,
    adapter_index: torch.Tensor,
    *,
    diag: bool,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Semantics: g[t] = S[a] @ h[t] (diag: S[a] * h[t]) for a = adapter_index[t] >= 0; g[t] = 0 where a == -1.

    BGMV-like: each token gathers its own core. h: [T, k] float32.  S: [N, k, k] or [N, k], any
    float dtype.  adapter_index: [T] int32/int64 in [-1, N).  Returns a new float32 tensor [T, k].
    """
    b = _resolve(backend, h.device, "core_gather_mv", ("reference", "triton", "cuda"))
    if b == "reference":
        return reference.core_gather_mv_ref(h, S, adapter_index, diag=diag)
    if b == "cuda":
        from . import cuda_ops

        return cuda_ops.core_gather_mv(h, S, adapter_index, diag=diag)
    from . import triton_ops

    return triton_ops.core_gather_mv(h, S, adapter_index, diag=diag)


def core_segment_mv(
    h: torch.Tensor,
    S: torch.Tensor,
    seg_start: torch.Tensor,
    seg_adapter: torch.Tensor,
    *,
    diag: bool,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Semantics: g[s[i]:s[i+1]] = h[s[i]:s[i+1]] @ S[seg_adapter[i]].T (diag: * S[seg_adapter[i]]); other rows 0.

    SGMV-like, for prefill (tokens contiguous per adapter; ``segments_from_index`` builds the
    segments). h: [T, k] float32.  S: [N, k, k] or [N, k].  seg_start: [num_seg + 1] int,
    non-decreasing in [0, T].  seg_adapter: [num_seg] int in [-1, N).  Returns a new float32 [T, k].
    """
    b = _resolve(backend, h.device, "core_segment_mv", ("reference", "triton"))
    if b == "reference":
        return reference.core_segment_mv_ref(h, S, seg_start, seg_adapter, diag=diag)
    from . import triton_ops

    return triton_ops.core_segment_mv(h, S, seg_start, seg_adapter, diag=diag)


def expand(
    y: torch.Tensor,
    g: torch.Tensor,
    U: torch.Tensor,
    routing: Routing,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Semantics: y[t] += U[c(t)] @ g[t] (one GEMM per cluster); rows with c(t) == -1 untouched.

    y: [T, d_out] (modified in place and returned).  g: [T, k] float32.  U: [C, d_out, k] (same
    dtype as y for triton).  routing: ``route_tokens(...)``.
    """
    b = _resolve(backend, y.device, "expand", ("reference", "triton"))
    if b == "reference":
        return reference.expand_ref(y, g, U, routing.token_cluster)
    from . import triton_ops

    return triton_ops.expand(y, g, U, routing)


def dense_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    adapter_index: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Semantics: y[t] += B[a] @ (A[a] @ x[t]) for a = adapter_index[t] >= 0 (uncompressed LoRAs, the baseline).

    y: [T, d_out] (modified in place and returned).  x: [T, d_in].  A: [N, r, d_in] (lora_A),
    B: [N, d_out, r] (lora_B with scaling folded in).  adapter_index: [T] int32/int64 in [-1, N).
    """
    b = _resolve(backend, x.device, "dense_lora", ("reference", "triton"))
    if b == "reference":
        return reference.dense_lora_ref(y, x, A, B, adapter_index)
    from . import triton_ops

    return triton_ops.dense_lora(y, x, A, B, adapter_index)
