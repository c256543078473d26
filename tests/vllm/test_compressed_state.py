"""The per-slice state of the SOPPU-aware vLLM layers (no server, no vLLM import): cores per slot on
refcounted bases, against the kernels' fp32 reference and a dense float64 product per token."""

from __future__ import annotations

import pytest
import torch

from soppu_kernels import reference as R
from vllm_lora_resolver.compressed.state import SliceCores

D_IN, D_OUT, K = 40, 24, 8


def _basis(gen: torch.Generator, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(D_OUT, k, generator=gen) / k**0.5, torch.randn(D_IN, k, generator=gen) / D_IN**0.5


def _dense(y0: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, slots: dict[int, tuple]) -> torch.Tensor:
    """y + x @ (U S V^T)^T per token in float64 (the slot's adapter; none for -1 or an empty slot)."""
    y = y0.double().clone()
    for t, s in enumerate(idx.tolist()):
        if s in slots:
            U, V, S = slots[s]
            y[t] += (U.double() @ S.double() @ V.double().T) @ x[t].double()
    return y


def test_cores_on_shared_bases_match_dense_and_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    st = SliceCores(n_slots=6, d_in=D_IN, d_out=D_OUT, k=K, dtype=torch.float32, device="cpu")
    (Ua, Va), (Ub, Vb) = _basis(gen, K), _basis(gen, 5)  # basis b has a smaller k: zero-padded to K
    slots = {0: (Ua, Va, torch.randn(K, K, generator=gen)), 2: (Ub, Vb, torch.randn(5, 5, generator=gen)),
             3: (Ua, Va, torch.randn(K, K, generator=gen))}
    for s, (U, V, S) in slots.items():
        st.set(s, "A" if U is Ua else "B", U, V, S)
    assert len(st.blocks) == 2 and st.U.shape == (2, D_OUT, K), "one resident block per distinct basis"
    x = torch.randn(9, D_IN, generator=gen)
    idx = torch.tensor([0, -1, 2, 3, 1, 0, 2, -1, 5])  # 1 and 5: slots without a compressed adapter
    y0 = torch.randn(9, D_OUT, generator=gen)
    out = st.apply(y0.clone(), x, idx)
    dense = _dense(y0, x, idx, slots)
    moved = (dense - y0.double()).abs().max().item()
    assert moved > 1e-2, f"vacuous: the adapters change y by at most {moved}"
    torch.testing.assert_close(out.double(), dense, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[idx < 0], y0[idx < 0]) and torch.equal(out[idx == 1], y0[idx == 1])
    ref = R.shared_basis_lora_ref(y0.clone(), x, st.U, st.V, st.cores, idx, st.slot_block, diag=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_column_slice_of_a_packed_output() -> None:
    gen = torch.Generator().manual_seed(1)
    st = SliceCores(n_slots=2, d_in=D_IN, d_out=D_OUT, k=K, dtype=torch.float32, device="cpu")
    U, V = _basis(gen, K)
    S = torch.randn(K, K, generator=gen)
    st.set(1, "A", U, V, S)
    x = torch.randn(3, D_IN, generator=gen)
    wide = torch.randn(3, D_OUT + 7, generator=gen)
    before = wide.clone()
    st.apply(wide[:, 4:4 + D_OUT], x, torch.tensor([1, -1, 1]))
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + D_OUT:], before[:, 4 + D_OUT:])
    dense = _dense(before[:, 4:4 + D_OUT], x, torch.tensor([1, -1, 1]), {1: (U, V, S)})
    torch.testing.assert_close(wide[:, 4:4 + D_OUT].double(), dense, rtol=1e-5, atol=1e-5)


def test_bases_and_cores_are_freed_with_their_last_slot() -> None:
    gen = torch.Generator().manual_seed(2)
    st = SliceCores(n_slots=4, d_in=D_IN, d_out=D_OUT, k=K, dtype=torch.float32, device="cpu")
    (Ua, Va), (Ub, Vb) = _basis(gen, K), _basis(gen, K)
    Sb = torch.randn(K, K, generator=gen)
    st.set(0, "A", Ua, Va, torch.randn(K, K, generator=gen))
    st.set(1, "B", Ub, Vb, Sb)
    st.set(2, "A", Ua, Va, torch.randn(K, K, generator=gen))
    assert st.keys() == ["A", "B"] and st.basis_bytes == 2 * (D_OUT + D_IN) * K * 4
    st.clear(0)
    assert st.keys() == ["A", "B"], "basis A still has slot 2"
    st.clear(2)
    assert st.keys() == ["B"], "basis A left with its last slot"
    # Slot 1 now points at the compacted block of B and still computes B's adapter.
    x = torch.randn(2, D_IN, generator=gen)
    y0 = torch.zeros(2, D_OUT)
    out = st.apply(y0.clone(), x, torch.tensor([1, 0]))
    torch.testing.assert_close(out.double(), _dense(y0, x, torch.tensor([1, 0]), {1: (Ub, Vb, Sb)}), rtol=1e-5,
                               atol=1e-5)
    st.clear(1)
    assert st.keys() == [] and st.basis_bytes == 0 and st.cores is None and st.core_table_bytes == 0
    # Coming and going does not accumulate: the same adapters again, then gone again.
    for _ in range(3):
        st.set(3, "A", Ua, Va, torch.randn(K, K, generator=gen))
        st.set(0, "B", Ub, Vb, Sb)
        st.set(3, "B", Ub, Vb, Sb)  # a slot reused for another adapter releases what it held
        assert st.keys() == ["B"]
        st.clear(0)
        st.clear(3)
        assert st.basis_bytes == 0 and st.cores is None


def test_a_core_larger_than_the_layer_rank_is_refused() -> None:
    st = SliceCores(n_slots=1, d_in=D_IN, d_out=D_OUT, k=4, dtype=torch.float32, device="cpu")
    U, V = _basis(torch.Generator().manual_seed(3), 8)
    try:
        st.set(0, "A", U, V, torch.zeros(8, 8))
    except ValueError as e:
        assert "k=8 exceeds the layer's rank 4 (vLLM's --max-lora-rank)" in str(e)
    else:
        raise AssertionError("k above the layer rank was accepted")


def _three_adapters(device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(4)
    st = SliceCores(n_slots=5, d_in=D_IN, d_out=D_OUT, k=K, dtype=dtype, device=device)
    (Ua, Va), (Ub, Vb) = _basis(gen, K), _basis(gen, K)
    st.set(0, "A", Ua, Va, torch.randn(K, K, generator=gen))
    st.set(3, "B", Ub, Vb, torch.randn(K, K, generator=gen))
    st.set(4, "A", Ua, Va, torch.randn(K, K, generator=gen))
    x = torch.randn(7, D_IN, generator=gen).to(device=device, dtype=dtype)
    idx = torch.tensor([0, 3, -1, 4, 4, 2, 0], device=device)
    y0 = torch.randn(7, D_OUT, generator=gen).to(device=device, dtype=dtype)
    return st, x, idx, y0


def test_triton_path_under_the_interpreter() -> None:
    """The CUDA path's kernel choice (Triton, two bases as clusters), run by Triton's CPU interpreter."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("run with TRITON_INTERPRET=1 (the test command sets it) to interpret the Triton path on CPU")
    st, x, idx, y0 = _three_adapters("cpu", torch.float32)
    ref = st.apply(y0.clone(), x, idx, backend="reference")
    assert (ref - y0).abs().max() > 1e-2, "vacuous"
    out = st.apply(y0.clone(), x, idx, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_path_picks_the_kernels(dtype: torch.dtype) -> None:
    st, x, idx, y0 = _three_adapters("cuda", dtype)
    cpu, xc, ic, yc = _three_adapters("cpu", torch.float32)
    ref = cpu.apply(yc.clone(), xc, ic, backend="reference")
    out = st.apply(y0.clone(), x, idx)  # backend None on CUDA: soppu_kernels "auto" (Triton)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol)
