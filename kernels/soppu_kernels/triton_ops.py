"""Triton launchers: shrink / core multiply (BGMV, SGMV) / expand, the fused decode path, dense LoRA BGMV.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests without a GPU).
Block sizes are reasonable defaults, not tuned on hardware (no GPU was available when written).
"""

from __future__ import annotations

import os

import torch
import triton

from . import _triton_kernels as K
from ._routing import Routing, identity_routing, route_tokens
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


def _gemm_blocks(T: int, k: int, dtype: torch.dtype, op: str) -> tuple[int, int]:
    """(BLOCK_M, second tile size) for the ``op`` ("shrink": BLOCK_K over d_in; "expand": BLOCK_N
    over d_out) GEMM tiles, by batch size and dtype.

    fp16/bf16 tiles go to tensor cores. fp32 tiles (ieee dot on CUDA cores) keep operands and
    accumulator in registers, and 64-wide tiles spill (expand at rank 64 most), so fp32 takes
    32-wide tiles, and 16-deep shrink steps above rank 32. ``_compile_check`` compiles these
    settings and reads ptxas' spill count (kept in step with this function by hand).
    """
    block_m = 16 if T <= 16 else (32 if T <= 64 else 64)
    if interpreting():
        return block_m, 128
    if dtype == torch.float32:
        return min(block_m, 32), (16 if op == "shrink" and k > 32 else 32)
    return block_m, 64


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
    block_m, block_k = _gemm_blocks(T, k, x.dtype, "shrink")
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
    block_m, block_n = _gemm_blocks(T, k, y.dtype, "expand")
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
    shared_h: bool = False,
    split_d: int | None = None,
) -> torch.Tensor:
    """Semantics: y[t] += U[c] @ (S[a] @ (V[c].T @ x[t])) for a = adapter_index[t] >= 0, c = cluster_of_adapter[a].

    The decode path: no routing sort, no per-cluster grouping. Shapes and dtypes as
    ``shared_basis_lora``; y is modified in place and returned. No host sync.

    shared_h=False: one launch; each of a token's ``programs_per_token`` programs (splitting d_out)
    recomputes h = V[c].T x[t] (P reads of V[c] from L2 per token).
    shared_h=True: two launches (plus a zero fill when split_d > 1): ``decode_shrink_kernel``
    computes h once per token, split over ``split_d`` programs along d_in (relaxed atomic adds),
    then the core and expand read it. benchmarks/serve.py times both (``triton_fused`` /
    ``triton_fused2``). programs_per_token / split_d: None picks them from the batch size.
    """
    check_shared_basis(y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag)
    check_same_float_dtype("shared_basis_lora_fused", y=y, x=x, U=U, V=V)
    _check_device(y, x, U, V, S, adapter_index)
    T, d_in = x.shape
    C, d_out, k = U.shape
    if T == 0 or k == 0:
        return y
    has_coa = cluster_of_adapter is not None and C > 1
    coa = cluster_of_adapter if has_coa else adapter_index  # unused by the kernel without HAS_COA
    block_n = 256 if interpreting() else 128
    block_k = _rank_block(k, for_dot=False)
    # [BLOCK_D, BLOCK_K] fp32 accumulator tile: 4096 elements = 32 registers a thread at 4 warps.
    block_d = max(16, min(256 if interpreting() else 128, 4096 // block_k))
    n_blocks = triton.cdiv(d_out, block_n)
    per_token = programs_per_token
    if per_token is None:
        per_token = 1 if interpreting() else max(1, min(n_blocks, triton.cdiv(_TARGET_PROGRAMS, T)))
    h = x  # placeholder pointer, unused without H_GIVEN
    if shared_h:
        if split_d is None:
            max_split = triton.cdiv(d_in, 2 * block_d)  # at least 2 d-steps per program
            split_d = 1 if interpreting() else max(1, min(max_split, triton.cdiv(_TARGET_PROGRAMS, T)))
        split_d = max(1, min(split_d, triton.cdiv(d_in, block_d)))
        alloc = torch.zeros if split_d > 1 else torch.empty
        h = alloc(T, k, dtype=torch.float32, device=x.device)
        K.decode_shrink_kernel[(T, split_d)](
            h, x, V, adapter_index, coa,
            d_in, k,
            h.stride(0), h.stride(1),
            x.stride(0), x.stride(1),
            V.stride(0), V.stride(1), V.stride(2),
            HAS_COA=has_coa, ATOMIC=split_d > 1, BLOCK_D=block_d, BLOCK_K=block_k,
        )
    K.fused_decode_kernel[(T, per_token)](
        y, x, U, V, S, adapter_index, coa, h,
        d_in, d_out, k,
        y.stride(0), y.stride(1),
        x.stride(0), x.stride(1),
        U.stride(0), U.stride(1), U.stride(2),
        V.stride(0), V.stride(1), V.stride(2),
        *_s_strides(S, diag),
        h.stride(0), h.stride(1),
        DIAG=diag, HAS_COA=has_coa, H_GIVEN=shared_h,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_K=block_k,
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
    path: "gemm" (route, shrink GEMM per cluster, BGMV core, expand GEMM per cluster; with one
    cluster the tokens keep their order: ``identity_routing``), "fused"
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
    if U.shape[0] == 1:  # one basis: no sort (exact: rows with index -1 get g = 0, so y += 0)
        routing = identity_routing(T, x.device)
    else:
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
