"""Triton kernels (``@triton.jit`` bodies only; launch logic lives in ``triton_ops``).

Conventions for every kernel here:

* accumulation is float32; intermediates (h = V.T x, g = S h) are float32 tensors;
* ``CAST_FP32``: cast tl.dot operands to float32 first. Set under TRITON_INTERPRET=1, where the
  interpreter computes bf16 dots wrongly; on a GPU fp16/bf16 operands go to tensor cores as is;
* ``PREC``: tl.dot input_precision, "ieee" when operands are float32 (matches the reference),
  "tf32" otherwise (ignored for fp16/bf16);
* an adapter index of -1 means "no adapter": that token is skipped (y untouched, g = 0);
* tl.dot needs every tile dimension >= 16, so rank tiles are padded to max(16, next_pow2(k));
* matrix-vector loops (decode, BGMV shrink) accumulate products in a 2-D register tile and reduce
  once after the loop. The vector is loaded as a tile broadcast along the other axis, with the
  same pointer structure as the matrix tile, so both get one layout and the loop needs no
  layout change through shared memory (no barrier). Where the matrix is contiguous along the
  rank axis and x along d, the unit strides are kept unspecialised (``do_not_specialize``) for
  that. ``_compile_check.loop_barriers`` checks the PTX.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def shrink_kernel(
    x_ptr, v_ptr, h_ptr, order_ptr, cstart_ptr,
    d_in, k,
    stride_xt, stride_xd,
    stride_vc, stride_vd, stride_vk,
    stride_ht, stride_hk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, CAST_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """Semantics: h[t] = V[c].T @ x[t] for tokens t of cluster c = program_id(2) (one GEMM per cluster).

    Grid (cdiv(T, BLOCK_M), SPLIT_K, C); BLOCK_N >= k covers the whole rank. Rows are
    ``order[cstart[c]:cstart[c+1]]``. Split-K: program j of axis 1 sums its share of d_in and,
    with ATOMIC (SPLIT_K > 1), atomically adds into h, which the caller zero-initialises
    (a decode batch is a skinny GEMM: without split-K only cdiv(T, BLOCK_M) programs would run).
    x [T, d_in], V [C, d_in, k] same dtype; h [T, k] float32 (written for those rows only).
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    c = tl.program_id(2)
    seg_lo = tl.load(cstart_ptr + c)
    seg_hi = tl.load(cstart_ptr + c + 1)
    row0 = seg_lo + pid_m * BLOCK_M
    if row0 < seg_hi:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < seg_hi
        tok = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < k
        chunk = tl.cdiv(tl.cdiv(d_in, tl.num_programs(1)), BLOCK_K) * BLOCK_K
        d_lo = pid_k * chunk
        d_hi = tl.minimum(d_in, d_lo + chunk)
        v_base = v_ptr + c.to(tl.int64) * stride_vc
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(d_lo, d_hi, BLOCK_K):
            dd = d0 + tl.arange(0, BLOCK_K)
            dmask = dd < d_hi
            xt = tl.load(
                x_ptr + tok[:, None] * stride_xt + dd[None, :] * stride_xd,
                mask=rmask[:, None] & dmask[None, :], other=0.0,
            )
            vt = tl.load(
                v_base + dd[:, None] * stride_vd + cols[None, :] * stride_vk,
                mask=dmask[:, None] & cmask[None, :], other=0.0,
            )
            if CAST_FP32:
                xt = xt.to(tl.float32)
                vt = vt.to(tl.float32)
            acc = tl.dot(xt, vt, acc, input_precision=PREC)
        h_ptrs = h_ptr + tok[:, None] * stride_ht + cols[None, :] * stride_hk
        hmask = rmask[:, None] & cmask[None, :]
        if ATOMIC:  # relaxed: the adds only need atomicity; no ordering with other memory ops
            tl.atomic_add(h_ptrs, acc, mask=hmask, sem="relaxed")
        else:
            tl.store(h_ptrs, acc, mask=hmask)


@triton.jit
def expand_kernel(
    y_ptr, g_ptr, u_ptr, order_ptr, cstart_ptr,
    d_out, k,
    stride_yt, stride_yd,
    stride_gt, stride_gk,
    stride_uc, stride_ud, stride_uk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CAST_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """Semantics: y[t] += U[c] @ g[t] for tokens t of cluster c = program_id(2) (one GEMM per cluster).

    Grid (cdiv(T, BLOCK_M), cdiv(d_out, BLOCK_N), C); BLOCK_K >= k covers the whole rank.
    y [T, d_out] (modified in place), g [T, k] float32, U [C, d_out, k] same dtype as y.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    c = tl.program_id(2)
    seg_lo = tl.load(cstart_ptr + c)
    seg_hi = tl.load(cstart_ptr + c + 1)
    row0 = seg_lo + pid_m * BLOCK_M
    if row0 < seg_hi:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < seg_hi
        tok = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
        kk = tl.arange(0, BLOCK_K)
        kmask = kk < k
        nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = nn < d_out
        gt = tl.load(
            g_ptr + tok[:, None] * stride_gt + kk[None, :] * stride_gk,
            mask=rmask[:, None] & kmask[None, :], other=0.0,
        )
        ut = tl.load(  # [BLOCK_K, BLOCK_N] tile of U[c].T
            u_ptr + c.to(tl.int64) * stride_uc + nn[None, :] * stride_ud + kk[:, None] * stride_uk,
            mask=kmask[:, None] & nmask[None, :], other=0.0,
        )
        if CAST_FP32:
            ut = ut.to(tl.float32)
        else:
            gt = gt.to(ut.dtype)
        acc = tl.dot(gt, ut, input_precision=PREC)
        y_ptrs = y_ptr + tok[:, None] * stride_yt + nn[None, :] * stride_yd
        ymask = rmask[:, None] & nmask[None, :]
        yv = tl.load(y_ptrs, mask=ymask, other=0.0)
        tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(yv.dtype), mask=ymask)


@triton.jit
def core_bgmv_kernel(
    g_ptr, h_ptr, s_ptr, idx_ptr,
    k,
    stride_gt, stride_gk,
    stride_ht, stride_hk,
    stride_sn, stride_si, stride_sj,
    DIAG: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Semantics: g[t] = S[a] @ h[t] (DIAG: S[a] * h[t]) for a = idx[t] >= 0, g[t] = 0 for a == -1.

    Grid (T,): one token per program, S gathered by index (BGMV). h, g [T, k] float32;
    S [N, k, k] (stride_sj unused when DIAG, S [N, k]) any float dtype.
    """
    t = tl.program_id(0).to(tl.int64)
    a = tl.load(idx_ptr + t).to(tl.int64)
    ii = tl.arange(0, BLOCK_K)
    imask = ii < k
    out = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if a >= 0:
        s_base = s_ptr + a * stride_sn
        if DIAG:
            hv = tl.load(h_ptr + t * stride_ht + ii * stride_hk, mask=imask, other=0.0)
            sv = tl.load(s_base + ii * stride_si, mask=imask, other=0.0).to(tl.float32)
            out = sv * hv
        else:
            jj = tl.arange(0, BLOCK_K)
            jmask = jj < k
            hv = tl.load(h_ptr + t * stride_ht + jj * stride_hk, mask=jmask, other=0.0)
            st = tl.load(
                s_base + ii[:, None] * stride_si + jj[None, :] * stride_sj,
                mask=imask[:, None] & jmask[None, :], other=0.0,
            ).to(tl.float32)
            out = tl.sum(st * hv[None, :], axis=1)
    tl.store(g_ptr + t * stride_gt + ii * stride_gk, out, mask=imask)


@triton.jit
def core_sgmv_kernel(
    g_ptr, h_ptr, s_ptr, seg_start_ptr, seg_adapter_ptr,
    k,
    stride_gt, stride_gk,
    stride_ht, stride_hk,
    stride_sn, stride_si, stride_sj,
    DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    """Semantics: g[s[i]:s[i+1]] = h[s[i]:s[i+1]] @ S[seg_adapter[i]].T (DIAG: * S[seg_adapter[i]]).

    Grid (num_seg, SPLIT): segment i's rows are processed in BLOCK_M blocks, program j taking
    blocks j, j + SPLIT, ...; the core is loaded once per program (SGMV, for prefill).
    Segments with adapter -1 are skipped (g must be zero-initialised by the caller).
    h, g [T, k] float32; S [N, k, k] or [N, k] any float dtype.
    """
    seg = tl.program_id(0)
    split = tl.program_id(1)
    a = tl.load(seg_adapter_ptr + seg).to(tl.int64)
    lo = tl.load(seg_start_ptr + seg)
    hi = tl.load(seg_start_ptr + seg + 1)
    if a >= 0:
        s_base = s_ptr + a * stride_sn
        ii = tl.arange(0, BLOCK_K)
        imask = ii < k
        if DIAG:
            sv = tl.load(s_base + ii * stride_si, mask=imask, other=0.0).to(tl.float32)
            st = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
        else:
            sv = tl.zeros((BLOCK_K,), dtype=tl.float32)
            st = tl.load(  # [j, i] tile of S[a].T
                s_base + ii[None, :] * stride_si + ii[:, None] * stride_sj,
                mask=imask[None, :] & imask[:, None], other=0.0,
            ).to(tl.float32)
        for m0 in range(lo + split * BLOCK_M, hi, SPLIT * BLOCK_M):
            rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < hi
            m2 = rmask[:, None] & imask[None, :]
            ht = tl.load(h_ptr + rows[:, None] * stride_ht + ii[None, :] * stride_hk, mask=m2, other=0.0)
            if DIAG:
                out = ht * sv[None, :]
            else:
                out = tl.dot(ht, st, input_precision="ieee")
            tl.store(g_ptr + rows[:, None] * stride_gt + ii[None, :] * stride_gk, out, mask=m2)


@triton.jit
def _vt_x(x_row, v_base, d_lo, d_hi, stride_xd, stride_vd, stride_vk, kk, kmask,
          BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Semantics: returns h[kk] = sum_{d_lo <= d < d_hi} V[d, kk] * x[d] (float32, [BLOCK_K]).

    x_row points at one token's x (stride stride_xd), v_base at one basis V [d_in, k]. Products
    accumulate in a [BLOCK_D, BLOCK_K] register tile reduced once after the loop; x is loaded
    already broadcast along k, in V's tile layout, so the loop needs no layout change (no barrier).
    Inlined into each caller (decode shrink, fused decode).
    """
    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < d_hi
        xv = tl.load(  # x[dd] broadcast along k: V's tile layout (see module docstring)
            x_row + dd[:, None] * stride_xd + kk[None, :] * 0,
            mask=dmask[:, None] & kmask[None, :], other=0.0,
        ).to(tl.float32)
        vt = tl.load(
            v_base + dd[:, None] * stride_vd + kk[None, :] * stride_vk,
            mask=dmask[:, None] & kmask[None, :], other=0.0,
        ).to(tl.float32)
        acc += xv * vt
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["stride_xd", "stride_vk"])
def decode_shrink_kernel(
    h_ptr, x_ptr, v_ptr, idx_ptr, coa_ptr,
    d_in, k,
    stride_ht, stride_hk,
    stride_xt, stride_xd,
    stride_vc, stride_vd, stride_vk,
    HAS_COA: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Semantics: h[t] (+)= V[c].T @ x[t] over program j's share of d_in, for a = idx[t] >= 0, c = coa[a].

    Grid (T, SPLIT_D), the first half of the two-launch decode path: V[c] is read once per token
    in total, split over SPLIT_D programs. ATOMIC (SPLIT_D > 1): relaxed atomic adds into h, which
    the caller zero-initialises; otherwise h[t] is stored. Tokens with a == -1 write nothing.
    Products accumulate in a [BLOCK_D, BLOCK_K] register tile, reduced once after the loop (no
    barrier inside it). x [T, d_in], V [C, d_in, k] one dtype; h [T, k] float32; coa unused
    without HAS_COA (one cluster).
    """
    t = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    a = tl.load(idx_ptr + t).to(tl.int64)
    if a >= 0:
        if HAS_COA:
            c = tl.load(coa_ptr + a).to(tl.int64)
        else:
            c = 0
        kk = tl.arange(0, BLOCK_K)
        kmask = kk < k
        chunk = tl.cdiv(tl.cdiv(d_in, tl.num_programs(1)), BLOCK_D) * BLOCK_D
        d_lo = pid_d * chunk
        d_hi = tl.minimum(d_in, d_lo + chunk)
        h = _vt_x(x_ptr + t * stride_xt, v_ptr + c * stride_vc, d_lo, d_hi, stride_xd, stride_vd, stride_vk,
                  kk, kmask, BLOCK_D, BLOCK_K)
        h_ptrs = h_ptr + t * stride_ht + kk * stride_hk
        if ATOMIC:
            tl.atomic_add(h_ptrs, h, mask=kmask, sem="relaxed")
        else:
            tl.store(h_ptrs, h, mask=kmask)


@triton.jit(do_not_specialize=["stride_xd", "stride_vk"])
def fused_decode_kernel(
    y_ptr, x_ptr, u_ptr, v_ptr, s_ptr, idx_ptr, coa_ptr, h_ptr,
    d_in, d_out, k,
    stride_yt, stride_yd,
    stride_xt, stride_xd,
    stride_uc, stride_ud, stride_uk,
    stride_vc, stride_vd, stride_vk,
    stride_sn, stride_si, stride_sj,
    stride_ht, stride_hk,
    DIAG: tl.constexpr, HAS_COA: tl.constexpr, H_GIVEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Semantics: y[t, n-blocks] += U[c] @ (S[a] @ (V[c].T @ x[t])) for a = idx[t] >= 0, c = coa[a].

    Grid (T, P): program j of token t updates the BLOCK_N slices j, j + P, ... of y[t].
    Without H_GIVEN (the one-launch decode path) every program computes h = V[c].T x[t] itself
    (V stays in L2 across a token's P programs), accumulating products in a [BLOCK_D, BLOCK_K]
    register tile that is reduced once after the d-loop (no barrier inside it). With H_GIVEN
    (the two-launch path) h[t] was computed once by ``decode_shrink_kernel`` and is read from h.
    Then g = S[a] h and the expand. No tl.dot: fp32 math throughout.
    y [T, d_out] (modified in place), x [T, d_in], U [C, d_out, k], V [C, d_in, k] one dtype;
    S [N, k, k] or [N, k]; idx [T]; coa [N] (unused without HAS_COA: one cluster);
    h [T, k] float32 (read with H_GIVEN only; x and V are then unused).
    """
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    a = tl.load(idx_ptr + t).to(tl.int64)
    if a >= 0:
        if HAS_COA:
            c = tl.load(coa_ptr + a).to(tl.int64)
        else:
            c = 0
        kk = tl.arange(0, BLOCK_K)
        kmask = kk < k
        if H_GIVEN:
            h = tl.load(h_ptr + t * stride_ht + kk * stride_hk, mask=kmask, other=0.0)
        else:
            h = _vt_x(x_ptr + t * stride_xt, v_ptr + c * stride_vc, 0, d_in, stride_xd, stride_vd, stride_vk,
                      kk, kmask, BLOCK_D, BLOCK_K)
        s_base = s_ptr + a * stride_sn
        if DIAG:
            g = h * tl.load(s_base + kk * stride_si, mask=kmask, other=0.0).to(tl.float32)
        else:
            # g[i] = sum_j S[i, j] h[j], with the tile laid out [j, i] so h broadcasts along rows.
            st = tl.load(
                s_base + kk[None, :] * stride_si + kk[:, None] * stride_sj,
                mask=kmask[None, :] & kmask[:, None], other=0.0,
            ).to(tl.float32)
            g = tl.sum(st * h[:, None], axis=0)
        for n0 in range(pid_n * BLOCK_N, d_out, tl.num_programs(1) * BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            nmask = nn < d_out
            ut = tl.load(
                u_ptr + c * stride_uc + nn[:, None] * stride_ud + kk[None, :] * stride_uk,
                mask=nmask[:, None] & kmask[None, :], other=0.0,
            ).to(tl.float32)
            dy = tl.sum(ut * g[None, :], axis=1)
            y_ptrs = y_ptr + t * stride_yt + nn * stride_yd
            yv = tl.load(y_ptrs, mask=nmask, other=0.0)
            tl.store(y_ptrs, (yv.to(tl.float32) + dy).to(yv.dtype), mask=nmask)


@triton.jit
def lora_shrink_bgmv_kernel(
    mid_ptr, x_ptr, a_ptr, idx_ptr,
    d_in, r,
    stride_mt, stride_mr,
    stride_xt, stride_xd,
    stride_an, stride_ar, stride_ad,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Semantics: mid[t] = A[a] @ x[t] for a = idx[t] >= 0 (uncompressed LoRA, BGMV shrink); mid[t] = 0 for -1.

    Grid (T,). Products accumulate in a [BLOCK_R, BLOCK_D] register tile, reduced once after the
    d-loop (no barrier inside it). x [T, d_in]; A [N, r, d_in] same dtype; mid [T, r] float32.
    """
    t = tl.program_id(0).to(tl.int64)
    a = tl.load(idx_ptr + t).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < r
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    if a >= 0:
        a_base = a_ptr + a * stride_an
        for d0 in range(0, d_in, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < d_in
            xv = tl.load(  # x[t, dd] broadcast along r: A's tile layout (see module docstring)
                x_ptr + t * stride_xt + rr[:, None] * 0 + dd[None, :] * stride_xd,
                mask=rmask[:, None] & dmask[None, :], other=0.0,
            ).to(tl.float32)
            at = tl.load(
                a_base + rr[:, None] * stride_ar + dd[None, :] * stride_ad,
                mask=rmask[:, None] & dmask[None, :], other=0.0,
            ).to(tl.float32)
            acc += at * xv
    tl.store(mid_ptr + t * stride_mt + rr * stride_mr, tl.sum(acc, axis=1), mask=rmask)


@triton.jit
def lora_expand_bgmv_kernel(
    y_ptr, mid_ptr, b_ptr, idx_ptr,
    d_out, r,
    stride_yt, stride_yd,
    stride_mt, stride_mr,
    stride_bn, stride_bd, stride_br,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Semantics: y[t, n-block] += B[a] @ mid[t] for a = idx[t] >= 0 (uncompressed LoRA, BGMV expand).

    Grid (T, cdiv(d_out, BLOCK_N)). y [T, d_out] (modified in place); mid [T, r] float32;
    B [N, d_out, r] same dtype as y.
    """
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    a = tl.load(idx_ptr + t).to(tl.int64)
    if a >= 0:
        rr = tl.arange(0, BLOCK_R)
        rmask = rr < r
        nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = nn < d_out
        vv = tl.load(mid_ptr + t * stride_mt + rr * stride_mr, mask=rmask, other=0.0)
        bt = tl.load(
            b_ptr + a * stride_bn + nn[:, None] * stride_bd + rr[None, :] * stride_br,
            mask=nmask[:, None] & rmask[None, :], other=0.0,
        ).to(tl.float32)
        dy = tl.sum(bt * vv[None, :], axis=1)
        y_ptrs = y_ptr + t * stride_yt + nn * stride_yd
        yv = tl.load(y_ptrs, mask=nmask, other=0.0)
        tl.store(y_ptrs, (yv.to(tl.float32) + dy).to(yv.dtype), mask=nmask)


#: name -> kernel, for the compile checks.
ALL_KERNELS = {
    "shrink_kernel": shrink_kernel,
    "expand_kernel": expand_kernel,
    "core_bgmv_kernel": core_bgmv_kernel,
    "core_sgmv_kernel": core_sgmv_kernel,
    "decode_shrink_kernel": decode_shrink_kernel,
    "fused_decode_kernel": fused_decode_kernel,
    "lora_shrink_bgmv_kernel": lora_shrink_bgmv_kernel,
    "lora_expand_bgmv_kernel": lora_expand_bgmv_kernel,
}
