"""Triton kernels against the fp32 reference (CPU: TRITON_INTERPRET=1, set by conftest.py).

Sizes stay small (T <= 64, hidden <= 300): the interpreter runs each program in Python.
"""

from __future__ import annotations

import pytest
import torch

import soppu_kernels as sk
from soppu_kernels import reference as R

from tests.kernels.kernel_cases import (
    DTYPES,
    POPULARITY,
    Case,
    adapter_indices,
    assert_matches_reference,
    case_grid,
    make_inputs,
)

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def _run(case: Case, seed: int, **kw: object) -> None:
    inp = make_inputs(case, DEVICE, seed=seed)
    y0 = inp["y"].clone()
    args = (inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"], inp["cluster_of_adapter"])
    ref = R.shared_basis_lora_ref(y0.clone(), *args, diag=case.diag)
    y = y0.clone()
    out = sk.shared_basis_lora(y, *args, diag=case.diag, backend="triton", **kw)
    assert out is y, "the op must work in place and return y"
    assert_matches_reference(out, ref, y0, inp["adapter_index"], case.dtype, gpu=ON_GPU)


@pytest.mark.parametrize("case", case_grid(30), ids=lambda c: c.id)
def test_gemm_path_matches_reference(case: Case) -> None:
    _run(case, seed=10, path="gemm")


@pytest.mark.parametrize("case", case_grid(30)[::2], ids=lambda c: c.id)
def test_fused_decode_path_matches_reference(case: Case) -> None:
    _run(case, seed=11, path="fused")


@pytest.mark.parametrize("case", case_grid(30)[1::4], ids=lambda c: c.id)
def test_two_launch_decode_path_matches_reference(case: Case) -> None:
    """shared_h: h computed once per token (split over d_in, relaxed atomic adds), then core + expand."""
    from soppu_kernels import triton_ops

    inp = make_inputs(case, DEVICE, seed=25)
    y0 = inp["y"].clone()
    args = (inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"], inp["cluster_of_adapter"])
    ref = R.shared_basis_lora_ref(y0.clone(), *args, diag=case.diag)
    for split_d in (None, 3):
        out = triton_ops.shared_basis_lora_fused(y0.clone(), *args, diag=case.diag, shared_h=True,
                                                 split_d=split_d, programs_per_token=2)
        assert_matches_reference(out, ref, y0, inp["adapter_index"], case.dtype, gpu=ON_GPU)


@pytest.mark.parametrize("split", [2, 3])
def test_split_k_shrink_and_split_n_fused(split: int) -> None:
    """The GPU launch shapes: split-K shrink (atomic adds, uneven d_in chunks) and several fused
    programs per token (strided d_out blocks)."""
    from soppu_kernels import triton_ops

    case = Case(T=20, d_in=300, d_out=290, k=16, N=9, C=2, popularity="zipf", neg_frac=0.25,
                dtype="fp16", diag=False)
    inp = make_inputs(case, DEVICE, seed=19)
    y0 = inp["y"].clone()
    args = (inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"], inp["cluster_of_adapter"])
    ref = R.shared_basis_lora_ref(y0.clone(), *args, diag=False)
    routing = sk.route_tokens(inp["adapter_index"], inp["cluster_of_adapter"], case.C)
    h = triton_ops.shrink(inp["x"], inp["V"], routing, split_k=split)
    torch.testing.assert_close(h.cpu(), R.shrink_ref(inp["x"], inp["V"], routing.token_cluster).cpu(),
                               rtol=5e-3, atol=5e-3)
    g = triton_ops.core_gather_mv(h, inp["S"], inp["adapter_index"], diag=False)
    out = triton_ops.expand(y0.clone(), g, inp["U"], routing)
    assert_matches_reference(out, ref, y0, inp["adapter_index"], "fp16", gpu=ON_GPU)
    fused = triton_ops.shared_basis_lora_fused(y0.clone(), *args, diag=False, programs_per_token=split)
    assert_matches_reference(fused, ref, y0, inp["adapter_index"], "fp16", gpu=ON_GPU)


def test_no_cluster_map_means_one_cluster() -> None:
    case = Case(T=9, d_in=50, d_out=30, k=8, N=5, C=1, popularity="zipf", neg_frac=0.25,
                dtype="fp32", diag=False)
    inp = make_inputs(case, DEVICE, seed=12)
    y0 = inp["y"].clone()
    args = (inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"])
    ref = R.shared_basis_lora_ref(y0.clone(), *args, None, diag=False)
    for path in ("gemm", "fused"):
        out = sk.shared_basis_lora(y0.clone(), *args, None, diag=False, backend="triton", path=path)
        assert_matches_reference(out, ref, y0, inp["adapter_index"], "fp32", gpu=ON_GPU)


def test_empty_batch_and_all_minus_one() -> None:
    case = Case(T=8, d_in=20, d_out=12, k=4, N=3, C=2, popularity="one_hot", neg_frac=0.0,
                dtype="fp16", diag=True)
    inp = make_inputs(case, DEVICE, seed=13)
    none = torch.full_like(inp["adapter_index"], -1)
    for path in ("gemm", "fused"):
        y = inp["y"].clone()
        sk.shared_basis_lora(y, inp["x"], inp["U"], inp["V"], inp["S"], none,
                             inp["cluster_of_adapter"], diag=True, backend="triton", path=path)
        assert torch.equal(y, inp["y"])
        empty = sk.shared_basis_lora(inp["y"][:0].clone(), inp["x"][:0], inp["U"], inp["V"], inp["S"],
                                     none[:0], inp["cluster_of_adapter"], diag=True, backend="triton", path=path)
        assert empty.shape == (0, case.d_out)


def test_non_contiguous_inputs() -> None:
    """Strided x / y views (e.g. a slice of a fused QKV output) are handled through strides."""
    case = Case(T=12, d_in=40, d_out=24, k=16, N=4, C=2, popularity="distinct", neg_frac=0.25,
                dtype="fp16", diag=False)
    inp = make_inputs(case, DEVICE, seed=14)
    big_y = torch.randn(case.T, 3 * case.d_out, device=DEVICE).to(torch.float16)
    big_x = torch.randn(case.T, 2 * case.d_in, device=DEVICE).to(torch.float16)
    x = big_x[:, 1::2]
    y0 = big_y[:, case.d_out: 2 * case.d_out].clone()
    rest = (inp["U"], inp["V"], inp["S"], inp["adapter_index"], inp["cluster_of_adapter"])
    ref = R.shared_basis_lora_ref(y0.clone(), x, *rest, diag=False)
    for path in ("gemm", "fused"):
        big = big_y.clone()
        y = big[:, case.d_out: 2 * case.d_out]
        sk.shared_basis_lora(y, x, *rest, diag=False, backend="triton", path=path)
        assert_matches_reference(y, ref, y0, inp["adapter_index"], "fp16", gpu=ON_GPU)
        assert torch.equal(big[:, : case.d_out], big_y[:, : case.d_out])  # neighbours untouched


# --- pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", case_grid(30)[1::3], ids=lambda c: c.id)
def test_shrink_and_expand_match_reference(case: Case) -> None:
    inp = make_inputs(case, DEVICE, seed=15)
    routing = sk.route_tokens(inp["adapter_index"], inp["cluster_of_adapter"], case.C)
    h_ref = R.shrink_ref(inp["x"], inp["V"], routing.token_cluster)
    h = sk.shrink(inp["x"], inp["V"], routing, backend="triton")
    assert h.dtype == torch.float32
    if bool((routing.token_cluster >= 0).any()):
        assert h_ref.abs().max() > 0.1
    tol = 1e-4 if case.dtype == "fp32" else 5e-3
    torch.testing.assert_close(h.cpu(), h_ref.cpu(), rtol=tol, atol=tol)

    g = torch.randn(case.T, case.k, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y0 = inp["y"].clone()
    ref = R.expand_ref(y0.clone(), g, inp["U"], routing.token_cluster)
    out = sk.expand(y0.clone(), g, inp["U"], routing, backend="triton")
    assert_matches_reference(out, ref, y0, inp["adapter_index"], case.dtype, gpu=ON_GPU)


CORE_CASES = [
    (k, diag, s_dtype, pop, N)
    for i, (k, diag) in enumerate((k, d) for k in (4, 8, 16, 32, 64) for d in (False, True))
    for s_dtype, pop, N in [(("fp32", "fp16", "bf16")[i % 3], POPULARITY[i % 4], (1, 7, 128)[i % 3])]
]


@pytest.mark.parametrize("k,diag,s_dtype,pop,N", CORE_CASES)
def test_core_gather_mv_matches_reference(k: int, diag: bool, s_dtype: str, pop: str, N: int) -> None:
    gen = torch.Generator().manual_seed(16)
    T = 40
    h = torch.randn(T, k, generator=gen)
    S = (torch.randn(N, k, generator=gen) if diag else torch.randn(N, k, k, generator=gen)).to(DTYPES[s_dtype])
    idx = adapter_indices(T, N, pop, 0.2, gen).to(torch.int32)
    ref = R.core_gather_mv_ref(h, S, idx, diag=diag)
    if bool((idx >= 0).any()):
        assert ref.abs().max() > 0.1
    g = sk.core_gather_mv(h.to(DEVICE), S.to(DEVICE), idx.to(DEVICE), diag=diag, backend="triton")
    torch.testing.assert_close(g.cpu(), ref, rtol=1e-5, atol=1e-5)
    assert bool((g.cpu()[idx < 0] == 0).all())


@pytest.mark.parametrize("k,diag", [(4, False), (16, True), (32, False), (64, True), (8, False)])
def test_core_segment_mv_matches_reference(k: int, diag: bool) -> None:
    gen = torch.Generator().manual_seed(17)
    N, T = 6, 61
    h = torch.randn(T, k, generator=gen)
    S = torch.randn(N, k, generator=gen) if diag else torch.randn(N, k, k, generator=gen)
    # prefill-like: requests of varied length, an adapter repeated, a run without adapter, an empty segment
    lengths = [1, 17, 0, 9, 20, 14]
    adapters = [2, 5, 1, -1, 2, 0]
    seg_start = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seg_adapter = torch.tensor(adapters, dtype=torch.int32)
    ref = R.core_segment_mv_ref(h, S, seg_start, seg_adapter, diag=diag)
    assert ref.abs().max() > 0.1
    g = sk.core_segment_mv(h.to(DEVICE), S.to(DEVICE), seg_start.to(DEVICE), seg_adapter.to(DEVICE),
                           diag=diag, backend="triton")
    torch.testing.assert_close(g.cpu(), ref, rtol=1e-5, atol=1e-5)
    # same answer as the gather kernel on the per-token index
    idx = torch.repeat_interleave(seg_adapter, torch.tensor(lengths))
    torch.testing.assert_close(g.cpu(), R.core_gather_mv_ref(h, S, idx, diag=diag), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,r,d_in,d_out,N,pop",
    [("fp32", 8, 129, 77, 3, "zipf"), ("fp16", 16, 64, 64, 17, "distinct"),
     ("bf16", 16, 200, 33, 1, "identical"), ("fp16", 4, 31, 255, 128, "one_hot"),
     ("bf16", 32, 96, 100, 5, "zipf")],
)
def test_dense_lora_bgmv_matches_reference(dtype: str, r: int, d_in: int, d_out: int, N: int, pop: str) -> None:
    gen = torch.Generator().manual_seed(18)
    T, dt = 24, DTYPES[dtype]
    x = torch.randn(T, d_in, generator=gen).to(dt)
    y0 = torch.randn(T, d_out, generator=gen).to(dt)
    A = (torch.randn(N, r, d_in, generator=gen) * d_in**-0.5).to(dt)
    B = (torch.randn(N, d_out, r, generator=gen) * r**-0.5).to(dt)
    idx = adapter_indices(T, N, pop, 0.25, gen)
    ref = R.dense_lora_ref(y0.clone(), x, A, B, idx)
    dev = [t.to(DEVICE) for t in (x, A, B, idx)]
    out = sk.dense_lora(y0.clone().to(DEVICE), dev[0], dev[1], dev[2], dev[3], backend="triton")
    assert_matches_reference(out, ref, y0, idx, dtype, gpu=ON_GPU)
