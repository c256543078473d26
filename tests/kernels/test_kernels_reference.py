"""The fp32 references against independent computations (dense float64 products, per-token loops),
plus the checks that make the kernel comparisons able to fail."""

from __future__ import annotations

import pytest
import torch

import soppu_kernels as sk
from soppu_kernels import reference as R
from soppu_kernels.cuda_ops import gemm_pipeline

from tests.kernels.kernel_cases import Case, assert_matches_reference, case_grid, close, make_inputs


def _dense_oracle(inp: dict[str, torch.Tensor], diag: bool) -> torch.Tensor:
    """y + x @ dW_a.T per token with dW_a = U_c S_a V_c.T formed densely in float64 (small cases only)."""
    y = inp["y"].double().clone()
    for t, a in enumerate(inp["adapter_index"].tolist()):
        if a < 0:
            continue
        c = int(inp["cluster_of_adapter"][a])
        S = torch.diag(inp["S"][a].double()) if diag else inp["S"][a].double()
        dW = inp["U"][c].double() @ S @ inp["V"][c].double().T  # [d_out, d_in]
        y[t] += dW @ inp["x"][t].double()
    return y


@pytest.mark.parametrize("case", case_grid(15), ids=lambda c: c.id)
def test_reference_matches_dense_float64(case: Case) -> None:
    inp = make_inputs(case, seed=1)
    y0 = inp["y"].clone()
    ref = R.shared_basis_lora_ref(
        inp["y"], inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"],
        inp["cluster_of_adapter"], diag=case.diag,
    )
    assert ref is inp["y"], "the op must work in place and return y"
    oracle = _dense_oracle({**inp, "y": y0}, case.diag).to(y0.dtype)
    assert_matches_reference(ref, oracle, y0, inp["adapter_index"], case.dtype)


@pytest.mark.parametrize("case", case_grid(10), ids=lambda c: c.id)
def test_pieces_compose_to_the_op(case: Case) -> None:
    inp = make_inputs(case, seed=2)
    y0 = inp["y"].clone()
    full = R.shared_basis_lora_ref(
        y0.clone(), inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"],
        inp["cluster_of_adapter"], diag=case.diag,
    )
    routing = sk.route_tokens(inp["adapter_index"], inp["cluster_of_adapter"], case.C)
    h = sk.shrink(inp["x"], inp["V"], routing, backend="reference")
    g = sk.core_gather_mv(h, inp["S"], inp["adapter_index"], diag=case.diag, backend="reference")
    y = sk.expand(y0.clone(), g, inp["U"], routing, backend="reference")
    assert_matches_reference(y, full, y0, inp["adapter_index"], case.dtype)


@pytest.mark.parametrize("case", case_grid(8), ids=lambda c: c.id)
def test_cuda_path_glue_on_cpu(case: Case) -> None:
    """cuda_ops' GEMM glue (concatenated bases, gather/scatter per cluster) with the reference core."""
    inp = make_inputs(case, seed=3)
    y0 = inp["y"].clone()
    args = (inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"], inp["cluster_of_adapter"])
    ref = R.shared_basis_lora_ref(y0.clone(), *args, diag=case.diag)
    out = gemm_pipeline(y0.clone(), *args, diag=case.diag, core_fn=R.core_gather_mv_ref)
    assert_matches_reference(out, ref, y0, inp["adapter_index"], case.dtype)


def test_gemm_glue_epilogue_is_one_addmm() -> None:
    """The torch-GEMM epilogue adds in place: one addmm_ is the only op over [T, d_out] (no
    where / copy_ passes), for one and several clusters."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []
            self.paused = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if not self.paused:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
                self.names.append((func.__name__, shape))
            return out

    def core(*a, **kw):  # type: ignore[no-untyped-def]  # the core's own ops are not the epilogue's
        ops.paused = True
        try:
            return R.core_gather_mv_ref(*a, **kw)
        finally:
            ops.paused = False

    for C in (1, 3):
        case = Case(T=9, d_in=20, d_out=14, k=4, N=5, C=C, popularity="zipf", neg_frac=0.3,
                    dtype="fp16", diag=False)
        inp = make_inputs(case, seed=4)
        y0 = inp["y"].clone()
        args = (inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"], inp["cluster_of_adapter"])
        ref = R.shared_basis_lora_ref(y0.clone(), *args, diag=False)
        y = y0.clone()
        ops = Ops()
        with ops:
            out = gemm_pipeline(y, *args, diag=False, core_fn=core)
        assert_matches_reference(out, ref, y0, inp["adapter_index"], "fp16")
        full = [name for name, shape in ops.names if shape == (case.T, case.d_out)]
        assert full == ["addmm_.default"], f"ops over [T, d_out]: {full}"


def test_identity_routing_is_exact_at_one_cluster() -> None:
    """One basis: no sort; tokens without adapter go through the GEMMs with g = 0, y unchanged."""
    r = sk.identity_routing(5, "cpu")
    assert r.order.tolist() == [0, 1, 2, 3, 4] and r.cluster_start.tolist() == [0, 5]
    assert r.token_cluster.tolist() == [0] * 5 and r.num_clusters == 1
    assert sk.identity_routing(0, "cpu").cluster_start.tolist() == [0, 0]
    case = Case(T=11, d_in=40, d_out=24, k=8, N=4, C=1, popularity="zipf", neg_frac=0.4,
                dtype="bf16", diag=False)
    inp = make_inputs(case, seed=5)
    assert bool((inp["adapter_index"] < 0).any())
    y0 = inp["y"].clone()
    full = R.shared_basis_lora_ref(y0.clone(), inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"],
                                   None, diag=False)
    r = sk.identity_routing(case.T, "cpu")
    h = sk.shrink(inp["x"], inp["V"], r, backend="reference")
    g = sk.core_gather_mv(h, inp["S"], inp["adapter_index"], diag=False, backend="reference")
    assert bool((g[inp["adapter_index"] < 0] == 0).all())
    y = sk.expand(y0.clone(), g, inp["U"], r, backend="reference")
    assert_matches_reference(y, full, y0, inp["adapter_index"], case.dtype)


def test_route_tokens_groups_by_cluster() -> None:
    idx = torch.tensor([2, -1, 0, 1, -1, 2, 3])
    coa = torch.tensor([1, 0, 1, 2])
    r = sk.route_tokens(idx, coa, 3)
    assert r.token_cluster.tolist() == [1, -1, 1, 0, -1, 1, 2]
    assert r.cluster_start.tolist() == [2, 3, 6, 7]
    assert r.order.tolist() == [1, 4, 3, 0, 2, 5, 6]  # -1 tokens first, stable within a cluster
    assert r.token_cluster.tolist() == R.token_clusters_ref(idx, coa).tolist()


def test_segments_from_index() -> None:
    start, adapter = sk.segments_from_index(torch.tensor([-1, -1, 0, 0, 0, 3, 1, 1]))
    assert start.tolist() == [0, 2, 5, 6, 8]
    assert adapter.tolist() == [-1, 0, 3, 1]


def test_diag_equals_full_with_diagonal_core() -> None:
    case = case_grid(1)[0]
    inp = make_inputs(Case(**{**case.__dict__, "diag": True, "dtype": "fp32"}), seed=4)
    args = (inp["x"], inp["U"], inp["V"])
    idx, coa = inp["adapter_index"], inp["cluster_of_adapter"]
    a = R.shared_basis_lora_ref(inp["y"].clone(), *args, inp["S"], idx, coa, diag=True)
    b = R.shared_basis_lora_ref(inp["y"].clone(), *args, torch.diag_embed(inp["S"]), idx, coa, diag=False)
    torch.testing.assert_close(a, b)


def test_dense_lora_ref_matches_peft_formula() -> None:
    gen = torch.Generator().manual_seed(5)
    T, d_in, d_out, r, N = 9, 33, 21, 4, 3
    x, y = torch.randn(T, d_in, generator=gen), torch.randn(T, d_out, generator=gen)
    A, B = torch.randn(N, r, d_in, generator=gen), torch.randn(N, d_out, r, generator=gen)
    idx = torch.tensor([0, 1, 2, -1, 2, 2, 0, -1, 1])
    want = y.double().clone()
    for t, a in enumerate(idx.tolist()):
        if a >= 0:
            want[t] += (B[a].double() @ A[a].double()) @ x[t].double()  # delta_W = B @ A (PEFT)
    out = sk.dense_lora(y.clone(), x, A, B, idx, backend="reference")
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# --- the comparisons can fail -------------------------------------------------------------------


def _case_with_negatives() -> tuple[Case, dict[str, torch.Tensor]]:
    case = Case(T=16, d_in=40, d_out=24, k=8, N=4, C=2, popularity="zipf", neg_frac=0.4,
                dtype="fp16", diag=False)
    inp = make_inputs(case, seed=6)
    assert bool((inp["adapter_index"] == -1).any()) and bool((inp["adapter_index"] >= 0).any())
    return case, inp


def test_minus_one_read_as_last_adapter_is_caught() -> None:
    """A kernel that indexes S[-1] torch-style (last adapter) instead of skipping must fail the check."""
    case, inp = _case_with_negatives()
    args = (inp["x"], inp["U"], inp["V"], inp["S"])
    y0 = inp["y"].clone()
    ref = R.shared_basis_lora_ref(y0.clone(), *args, inp["adapter_index"], inp["cluster_of_adapter"], diag=False)
    wrong_idx = torch.where(inp["adapter_index"] < 0, case.N - 1, inp["adapter_index"])
    mutant = R.shared_basis_lora_ref(y0.clone(), *args, wrong_idx, inp["cluster_of_adapter"], diag=False)
    assert not close(mutant, ref, case.dtype)
    with pytest.raises(AssertionError, match="adapter_index -1 were modified"):
        assert_matches_reference(mutant, ref, y0, inp["adapter_index"], case.dtype)


def test_off_by_one_adapter_or_cluster_is_caught() -> None:
    case, inp = _case_with_negatives()
    args = (inp["x"], inp["U"], inp["V"], inp["S"])
    y0 = inp["y"].clone()
    idx, coa = inp["adapter_index"], inp["cluster_of_adapter"]
    ref = R.shared_basis_lora_ref(y0.clone(), *args, idx, coa, diag=False)
    shifted = torch.where(idx >= 0, (idx + 1) % case.N, idx)
    m1 = R.shared_basis_lora_ref(y0.clone(), *args, shifted, coa, diag=False)
    m2 = R.shared_basis_lora_ref(y0.clone(), *args, idx, (coa + 1) % case.C, diag=False)
    for mutant in (m1, m2):
        with pytest.raises(AssertionError):
            assert_matches_reference(mutant, ref, y0, idx, case.dtype)


def test_untouched_y_is_flagged_as_vacuous() -> None:
    """Deleting the op (returning y unchanged) fails the non-vacuity assertion."""
    case, inp = _case_with_negatives()
    y0 = inp["y"].clone()
    ref = R.shared_basis_lora_ref(y0.clone(), inp["x"], inp["U"], inp["V"], inp["S"],
                                  inp["adapter_index"], inp["cluster_of_adapter"], diag=False)
    with pytest.raises(AssertionError):
        assert_matches_reference(y0.clone(), ref, y0, inp["adapter_index"], case.dtype)


# --- argument errors ----------------------------------------------------------------------------


def test_out_of_range_index_raises() -> None:
    _, inp = _case_with_negatives()
    bad = inp["adapter_index"].clone()
    bad[3] = 4
    bad[5] = -2
    with pytest.raises(ValueError) as e:
        R.shared_basis_lora_ref(inp["y"], inp["x"], inp["U"], inp["V"], inp["S"], bad,
                                inp["cluster_of_adapter"], diag=False)
    assert str(e.value) == (
        "index check: `adapter_index` values must be in [-1, 4) (-1 = no adapter), got [4, -2]"
    )


def test_shape_errors_are_collected_into_one_message() -> None:
    _, inp = _case_with_negatives()
    with pytest.raises(ValueError) as e:
        R.shared_basis_lora_ref(inp["y"][:, :5], inp["x"], inp["U"], inp["V"][:, :7], inp["S"],
                                inp["adapter_index"], inp["cluster_of_adapter"], diag=False)
    assert str(e.value) == (
        "shared_basis_lora: `y` has 5 columns but `U` has d_out=24; "
        "`V` must be (2, 40, 8) (C, d_in, k), got (2, 7, 8)"
    )


def test_diag_flag_must_match_core_shape() -> None:
    _, inp = _case_with_negatives()
    with pytest.raises(ValueError, match=r"`S` must be \[N, k\] with diag=True, got shape \(4, 8, 8\)"):
        sk.shared_basis_lora(inp["y"], inp["x"], inp["U"], inp["V"], inp["S"],
                             inp["adapter_index"], inp["cluster_of_adapter"], diag=True)


def test_unknown_backend_lists_available() -> None:
    _, inp = _case_with_negatives()
    with pytest.raises(ValueError) as e:
        sk.shared_basis_lora(inp["y"], inp["x"], inp["U"], inp["V"], inp["S"],
                             inp["adapter_index"], inp["cluster_of_adapter"], diag=False, backend="cutlass")
    assert str(e.value) == (
        "`backend` 'cutlass' not found. Available backends: ['auto', 'reference', 'torch', 'triton', 'cuda']"
    )


def test_cuda_backend_without_gpu_says_why() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, inp = _case_with_negatives()
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        sk.shared_basis_lora(inp["y"], inp["x"], inp["U"], inp["V"], inp["S"],
                             inp["adapter_index"], inp["cluster_of_adapter"], diag=False, backend="cuda")
