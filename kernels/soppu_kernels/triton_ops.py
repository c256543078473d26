"""Triton launchers: shrink / core multiply (BGMV, SGMV) / expand, the fused decode path, dense LoRA BGMV.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests without a GPU).
Block sizes are reasonable defaults, not tuned on hardware (no GPU was available when written).
"""

from __future__ import annotations

import os

import torch
import triton

from . import _triton_kernels as K
from ._routing import Routing, route_tokens
from ._validate import check_core_mv, check_dense_lora, check_same_float_dtype, check_shared_basis

__all__ = [
    "FUSED_MAX_TOKENS",
    "core_gather_mv",
    "core_segment_mv",
    "dense_lora",
    "expand",
    "shared_basis_lora",
    "shared_basis_lora_fused",
    "shrink",
]

#: ``shared_basis_lora(path="auto")`` takes the fused single-launch path for at most this many
#: tokens (decode), the three-kernel GEMM path above. Untuned guess; measure with benchmarks/serve.py.
FUSED_MAX_TOKENS = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _rank_block(k: int, *, for_dot: bool) -> int:
    """Power-of-two tile covering rank k; tl.dot tiles need >= 16."""
    b = triton.next_power_of_2(max(k, 1))
    return max(b, 16) if for_dot else b


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(CAST_FP32, PREC) for tl.dot on operands of ``dtype`` (see _triton_kernels docstring)."""
    return interpreting(), ("ieee" if dtype == torch.float32 or interpreting() else "tf32")


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (got a tensor on {t.device}); "
                "set TRITON_INTERPRET=1 to run them on CPU, or use backend='reference'"
            )


#: Programs to aim for when splitting skinny GEMMs / decode work (about 2 per SM on an H100).
_TARGET_PROGRAMS = 264


def shrink(
    x: torch.Tensor, V: torch.Tensor, routing: Routing, *, split_k: int | None = None
) -> torch.Tensor:
    """Semantics: h[t] = V[c(t)].T @ x[t] (one GEMM per cluster over its tokens); h[t] = 0 where c(t) == -1.

    x: [T, d_in] fp16/bf16/fp32.  V: [C, d_in, k], same dtype as x.  routing: from ``route_tokens``.
    split_k: programs sharing d_in per row block (atomic fp32 adds when > 1; summation order then
    varies run to run); None picks one from the batch size.
    Returns a new float32 tensor h [T, k]; nothing is modified.
    """
    _check_device(x, V)
    check_same_float_dtype("shrink", x=x, V=V)
    T, d_in = x.shape
    C, _, k = V.shape
    h = torch.zeros(T, k, dtype=torch.float32, device=x.device)
    if T == 0 or k == 0:
        return h
    cast, prec = _dot_flags(x.dtype)
    block_m = 16 if T <= 16 else (32 if T <= 64 else 64)
    block_k = 128 if interpreting() else 64
    m_blocks = triton.cdiv(T, block_m)
    if split_k is None:
        max_split = triton.cdiv(d_in, 4 * block_k)  # at least 4 K-steps per program
        split_k = 1 if interpreting() else max(1, min(max_split, _TARGET_PROGRAMS // (m_blocks * C)))
    grid = (m_blocks, split_k, C)
    K.shrink_kernel[grid](
        x, V, h, routing.order, routing.cluster_start,
        d_in, k,
        x.stride(0), x.stride(1),
        V.stride(0), V.stride(1), V.stride(2),
        h.stride(0), h.stride(1),
        BLOCK_M=block_m, BLOCK_N=_rank_block(k, for_dot=True), BLOCK_K=block_k,
        ATOMIC=split_k > 1, CAST_FP32=cast, PREC=prec,
    )
    return h


def expand(y: torch.Tensor, g: torch.Tensor, U: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Semantics: y[t] += U[c(t)] @ g[t] (one GEMM per cluster over its tokens); rows with c(t) == -1 untouched.

    y: [T, d_out] fp16/bf16/fp32, modified in place and returned.  g: [T, k] float32.
    U: [C, d_out, k], same dtype as y.  routing: from ``route_tokens``.
    On a GPU with fp16/bf16, g is rounded to that dtype before the tensor-core dot.
    """
    _check_device(y, g, U)
    check_same_float_dtype("expand", y=y, U=U)
    T, d_out = y.shape
    C, _, k = U.shape
    if T == 0 or k == 0:
        return y
    g = g.float()
    cast, prec = _dot_flags(y.dtype)
    block_m = 16 if T <= 16 else (32 if T <= 64 else 64)
    block_n = 128 if interpreting() else 64
    grid = (triton.cdiv(T, block_m), triton.cdiv(d_out, block_n), C)
    K.expand_kernel[grid](
        y, g, U, routing.order, routing.cluster_start,
        d_out, k,
        y.stride(0), y.stride(1),
        g.stride(0), g.stride(1),
        U.stride(0), U.stride(1), U.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_rank_block(k, for_dot=True),
        CAST_FP32=cast, PREC=prec,
    )
    return y


def _s_strides(S: torch.Tensor, diag: bool) -> tuple[int, int, int]:
    return (S.stride(0), S.stride(1), 0) if diag else (S.stride(0), S.stride(1), S.stride(2))


def core_gather_mv(
    h: torch.Tensor, S: torch.Tensor, adapter_index: torch.Tensor, *, diag: bool
) -> torch.Tensor:
    """Semantics: g[t] = S[a] @ h[t] (diag: S[a] * h[t]) for a = adapter_index[t] >= 0; g[t] = 0 where a == -1.

    BGMV-like: one program per token gathers its core by index; any token order.
    h: [T, k] float32 (other float dtypes are converted).  S: [N, k, k] (full) or [N, k] (diag), any
    float dtype.  adapter_index: [T] int32/int64 in [-1, N).  Returns a new float32 tensor g [T, k].
    """
    _check_device(h, S, adapter_index)
    check_core_mv(h, S, diag=diag)
    h = h.float()
    T, k = h.shape
    g = torch.empty(T, k, dtype=torch.float32, device=h.device)
    if T == 0 or k == 0:
        return g
    K.core_bgmv_kernel[(T,)](
        g, h, S, adapter_index,
        k,
        g.stride(0), g.stride(1),
        h.stride(0), h.stride(1),
        *_s_strides(S, diag),
        DIAG=diag, BLOCK_K=_rank_block(k, for_dot=False),
        num_warps=1 if k <= 16 else (2 if k <= 32 else 4),
    )
    return g


def core_segment_mv(
    h: torch.Tensor,
    S: torch.Tensor,
    seg_start: torch.Tensor,
    seg_adapter: torch.Tensor,
    *,
    diag: bool,
    split: int = 4,
) -> torch.Tensor:
    """Semantics: g[s[i]:s[i+1]] = h[s[i]:s[i+1]] @ S[seg_adapter[i]].T (diag: * S[seg_adapter[i]]); other rows 0.

    SGMV-like, for prefill where each adapter's tokens are contiguous: the core is loaded once per
    program, not per token.  h: [T, k] float32.  S: [N, k, k] or [N, k], any float dtype.
    seg_start: [num_seg + 1] int32/int64, non-decreasing in [0, T] (see ``segments_from_index``).
    seg_adapter: [num_seg] int32/int64 in [-1, N).  split: programs per segment.
    Returns a new float32 tensor g [T, k].
    """
    _check_device(h, S, seg_start, seg_adapter)
    check_core_mv(h, S, diag=diag)
    if seg_start.shape[0] != seg_adapter.shape[0] + 1:
        raise ValueError(
            f"core_segment_mv: `seg_start` must have num_seg + 1 = {seg_adapter.shape[0] + 1} "
            f"entries, got {seg_start.shape[0]}"
        )
    h = h.float()
    T, k = h.shape
    g = torch.zeros(T, k, dtype=torch.float32, device=h.device)
    num_seg = seg_adapter.shape[0]
    if T == 0 or k == 0 or num_seg == 0:
        return g
    K.core_sgmv_kernel[(num_seg, split)](
        g, h, S, seg_start, seg_adapter,
        k,
        g.stride(0), g.stride(1),
        h.stride(0), h.stride(1),
        *_s_strides(S, diag),
        DIAG=diag, BLOCK_M=32 if interpreting() else 16,
        BLOCK_K=_rank_block(k, for_dot=True), SPLIT=split,
    )
    return g


def shared_basis_lora_fused(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    adapter_index: torch.Tensor,
    cluster_of_adapter: torch.Tensor | None = None,
    *,
    diag: bool,
    programs_per_token: int | None = None,
) -> torch.Tensor:
    """Semantics: y[t] += U[c] @ (S[a] @ (V[c].T @ x[t])) for a = adapter_index[t] >= 0, c = cluster_of_adapter[a].

    One launch, the decode path: no routing sort, no intermediates. Shapes and dtypes as ``shared_basis_lora``;
    y is modified in place and returned. programs_per_token: programs splitting d_out for each
    token (each recomputes V[c].T x[t]); None picks one from the batch size.
    """
    check_shared_basis(y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag)
    check_same_float_dtype("shared_basis_lora_fused", y=y, x=x, U=U, V=V)
    _check_device(y, x, U, V, S, adapter_index)
    T, d_in = x.shape
    C, d_out, k = U.shape
    if T == 0 or k == 0:
        return y
    if cluster_of_adapter is None:
        cluster_of_adapter = torch.zeros(S.shape[0], dtype=torch.int32, device=x.device)
    block_n = 256 if interpreting() else 128
    block_k = _rank_block(k, for_dot=False)
    block_d = max(16, min(256 if interpreting() else 128, 4096 // block_k))
    n_blocks = triton.cdiv(d_out, block_n)
    per_token = programs_per_token
    if per_token is None:
        per_token = 1 if interpreting() else max(1, min(n_blocks, triton.cdiv(_TARGET_PROGRAMS, T)))
    K.fused_decode_kernel[(T, per_token)](
        y, x, U, V, S, adapter_index, cluster_of_adapter,
        d_in, d_out, k,
        y.stride(0), y.stride(1),
        x.stride(0), x.stride(1),
        U.stride(0), U.stride(1), U.stride(2),
        V.stride(0), V.stride(1), V.stride(2),
        *_s_strides(S, diag),
        DIAG=diag, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y


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
    path: str = "auto",
) -> torch.Tensor:
    """Semantics: y[t] += U[c] @ (S[a] @ (V[c].T @ x[t])) for a = adapter_index[t] >= 0, c = cluster_of_adapter[a].

    y: [T, d_out] (modified in place and returned).  x: [T, d_in].  U: [C, d_out, k] and
    V: [C, d_in, k]; x, y, U, V share one dtype (fp16/bf16/fp32).  S: [N, k, k] or [N, k], any float.
    adapter_index: [T] int32/int64 in [-1, N).  cluster_of_adapter: [N] int in [0, C), or None (C = 1).
    path: "gemm" (route, shrink GEMM per cluster, BGMV core, expand GEMM per cluster), "fused"
    (one launch, decode), or "auto" (fused for T <= FUSED_MAX_TOKENS). No host sync on either path.
    """
    if path not in ("auto", "gemm", "fused"):
        raise ValueError(f"`path` must be 'auto', 'gemm' or 'fused', got {path!r}")
    T = x.shape[0] if x.dim() == 2 else 0
    if path == "fused" or (path == "auto" and T <= FUSED_MAX_TOKENS):
        return shared_basis_lora_fused(
            y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag
        )
    check_shared_basis(y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag)
    check_same_float_dtype("shared_basis_lora", y=y, x=x, U=U, V=V)
    routing = route_tokens(adapter_index, cluster_of_adapter, U.shape[0])
    h = shrink(x, V, routing)
    g = core_gather_mv(h, S, adapter_index, diag=diag)
    return expand(y, g, U, routing)


def dense_lora(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, adapter_index: torch.Tensor
) -> torch.Tensor:
    """Semantics: y[t] += B[a] @ (A[a] @ x[t]) for a = adapter_index[t] >= 0 (uncompressed LoRAs, BGMV).

    The baseline the compressed op is benchmarked against (punica-style shrink + expand).
    y: [T, d_out] (modified in place and returned).  x: [T, d_in].  A: [N, r, d_in],
    B: [N, d_out, r]; x, y, A, B share one dtype.  adapter_index: [T] int32/int64 in [-1, N).
    """
    check_dense_lora(y, x, A, B, adapter_index)
    check_same_float_dtype("dense_lora", y=y, x=x, A=A, B=B)
    _check_device(y, x, A, B, adapter_index)
    T, d_in = x.shape
    N, r, _ = A.shape
    d_out = y.shape[1]
    if T == 0 or r == 0:
        return y
    v = torch.empty(T, r, dtype=torch.float32, device=x.device)
    block_r = _rank_block(r, for_dot=False)
    K.lora_shrink_bgmv_kernel[(T,)](
        v, x, A, adapter_index,
        d_in, r,
        v.stride(0), v.stride(1),
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2),
        BLOCK_D=max(16, min(256, 4096 // block_r)), BLOCK_R=block_r,
    )
    block_n = 256 if interpreting() else 128
    K.lora_expand_bgmv_kernel[(T, triton.cdiv(d_out, block_n))](
        y, v, B, adapter_index,
        d_out, r,
        y.stride(0), y.stride(1),
        v.stride(0), v.stride(1),
        B.stride(0), B.stride(1), B.stride(2),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )
    return y
