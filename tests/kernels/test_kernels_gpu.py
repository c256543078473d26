"""On a CUDA device: Triton (both paths), the CUDA extension (built just in time) and the fp32
reference must agree, at sizes the interpreter cannot reach. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import soppu_kernels as sk
from soppu_kernels import reference as R

from tests.kernels.kernel_cases import DTYPES, Case, adapter_indices, assert_matches_reference, case_grid, make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BIG = [
    Case(T=T, d_in=d_in, d_out=d_out, k=k, N=N, C=C, popularity=pop, neg_frac=0.1, dtype=dt, diag=diag)
    for T, d_in, d_out, k, N, C, pop, dt, diag in [
        (1, 4096, 4096, 16, 1000, 1, "zipf", "fp16", False),
        (64, 4096, 4096, 16, 100, 1, "distinct", "bf16", False),
        (256, 4096, 1024, 32, 1000, 3, "zipf", "fp16", True),
        (1024, 576, 576, 64, 10, 2, "identical", "bf16", False),
        (333, 1001, 4095, 8, 128, 2, "one_hot", "fp32", True),
        (1024, 4096, 4096, 16, 1000, 1, "zipf", "fp32", False),
    ]
]


@pytest.mark.parametrize("case", case_grid(30) + BIG, ids=lambda c: c.id)
@pytest.mark.parametrize("backend,path", [("triton", "gemm"), ("triton", "fused"), ("cuda", "auto")])
def test_device_backends_match_reference(case: Case, backend: str, path: str) -> None:
    inp = make_inputs(case, "cuda", seed=20)
    y0 = inp["y"].clone()
    args = (inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"], inp["cluster_of_adapter"])
    ref = R.shared_basis_lora_ref(y0.clone(), *args, diag=case.diag)
    out = sk.shared_basis_lora(y0.clone(), *args, diag=case.diag, backend=backend, path=path)
    torch.cuda.synchronize()
    assert_matches_reference(out, ref, y0, inp["adapter_index"], case.dtype, gpu=True)


@pytest.mark.parametrize("k", [4, 8, 16, 32, 64, 100])
@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("s_dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_cuda_core_matches_triton_and_reference(k: int, diag: bool, s_dtype: str, idx_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(21)
    T, N = 777, 300
    h = torch.randn(T, k, generator=gen)
    S = (torch.randn(N, k, generator=gen) if diag else torch.randn(N, k, k, generator=gen)).to(DTYPES[s_dtype])
    idx = adapter_indices(T, N, "zipf", 0.2, gen).to(idx_dtype)
    ref = R.core_gather_mv_ref(h, S, idx, diag=diag)
    hd, Sd, id_ = h.cuda(), S.cuda(), idx.cuda()
    g_cuda = sk.core_gather_mv(hd, Sd, id_, diag=diag, backend="cuda")
    g_triton = sk.core_gather_mv(hd, Sd, id_, diag=diag, backend="triton")
    torch.testing.assert_close(g_cuda.cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_triton.cpu(), ref, rtol=1e-5, atol=1e-5)
    assert bool((g_cuda.cpu()[idx < 0] == 0).all())


@pytest.mark.parametrize("k,diag", [(16, False), (64, True)])
def test_segment_mv_on_device(k: int, diag: bool) -> None:
    gen = torch.Generator().manual_seed(22)
    N = 50
    idx = torch.sort(adapter_indices(2000, N, "zipf", 0.1, gen)).values
    h = torch.randn(idx.numel(), k, generator=gen)
    S = torch.randn(N, k, generator=gen) if diag else torch.randn(N, k, k, generator=gen)
    seg_start, seg_adapter = sk.segments_from_index(idx.cuda())
    g = sk.core_segment_mv(h.cuda(), S.cuda(), seg_start, seg_adapter, diag=diag, backend="triton")
    torch.testing.assert_close(g.cpu(), R.core_gather_mv_ref(h, S, idx, diag=diag), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dense_lora_bgmv_on_device(dtype: str) -> None:
    gen = torch.Generator().manual_seed(23)
    T, d, r, N, dt = 256, 4096, 16, 100, DTYPES[dtype]
    x = torch.randn(T, d, generator=gen).to(dt)
    y0 = torch.randn(T, d, generator=gen).to(dt)
    A = (torch.randn(N, r, d, generator=gen) * d**-0.5).to(dt)
    B = (torch.randn(N, d, r, generator=gen) * r**-0.5).to(dt)
    idx = adapter_indices(T, N, "zipf", 0.1, gen)
    ref = R.dense_lora_ref(y0.clone(), x, A, B, idx)
    out = sk.dense_lora(y0.clone().cuda(), x.cuda(), A.cuda(), B.cuda(), idx.cuda(), backend="triton")
    assert_matches_reference(out, ref, y0, idx, dtype, gpu=True)


def test_no_host_sync_in_gemm_path() -> None:
    """The triton GEMM path and the fused path must not synchronise with the host (CUDA-graph friendly)."""
    case = BIG[1]
    inp = make_inputs(case, "cuda", seed=24)
    args = (inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"], inp["cluster_of_adapter"])
    for path in ("gemm", "fused"):  # warm up: compile outside the checked region
        sk.shared_basis_lora(inp["y"], *args, diag=False, backend="triton", path=path)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for path in ("gemm", "fused"):
            sk.shared_basis_lora(inp["y"], *args, diag=False, backend="triton", path=path)
    finally:
        torch.cuda.set_sync_debug_mode("default")
