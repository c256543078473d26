"""Mixed per-module k (bundles made with --budget): layers of one type with different k, padded with
zeros to the largest k by ``pad_rank`` and run by one launch, equal a dense fp64 reference built
from the unpadded per-layer factors; odd ranks run unpadded too. Triton under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import pytest
import torch

import soppu_kernels as sk
from soppu_kernels import reference as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KS = (3, 5, 8)  # one "layer type", three layers of different k


def _layers(diag: bool, N: int = 4, d_in: int = 40, d_out: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in KS:
        U = torch.randn(d_out, k, generator=g) * k**-0.5
        V = torch.randn(d_in, k, generator=g) * d_in**-0.5
        S = torch.randn(N, k, generator=g) if diag else torch.randn(N, k, k, generator=g) * k**-0.5
        out.append((U, V, S))
    return out


def _dense(x: torch.Tensor, U, V, S, index: torch.Tensor, diag: bool) -> torch.Tensor:
    """y_t = (U S_a V.T) x_t with dW formed densely per adapter (float64): independent of the ops."""
    y = torch.zeros(x.shape[0], U.shape[0], dtype=torch.float64)
    for t, a in enumerate(index.tolist()):
        if a >= 0:
            core = torch.diag(S[a]) if diag else S[a]
            y[t] = (U.double() @ core.double() @ V.double().T) @ x[t].double()
    return y


def test_pad_rank_shapes_and_errors() -> None:
    U = torch.randn(6, 3)
    assert sk.pad_rank(U, 3) is U
    P = sk.pad_rank(U, 5)
    assert P.shape == (6, 5) and torch.equal(P[:, :3], U) and not P[:, 3:].any()
    S = sk.pad_rank(torch.randn(2, 3, 3), 4, axes=2)
    assert S.shape == (2, 4, 4) and not S[:, 3].any() and not S[:, :, 3].any()
    with pytest.raises(ValueError, match=r"cannot pad the last 1 dim\(s\) of a tensor of shape \(6, 3\) to rank 2"):
        sk.pad_rank(U, 2)


@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("backend,path", [("reference", None), ("triton", "gemm"), ("triton", "fused")])
def test_mixed_rank_layers_padded_to_one_k(diag: bool, path: str, backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    layers = _layers(diag)
    k_max = max(KS)
    T = 9
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 40, generator=g)
    index = torch.tensor([0, 1, -1, 3, 3, 2, -1, 0, 1])
    for (U, V, S), k in zip(layers, KS):
        want = _dense(x, U, V, S, index, diag)
        assert want.abs().max() > 1e-2  # the adapters do change y
        Up, Vp = sk.pad_rank(U, k_max), sk.pad_rank(V, k_max)
        Sp = sk.pad_rank(S, k_max, axes=1 if diag else 2)
        kw = {"path": path} if backend == "triton" else {}
        out = torch.zeros(T, 24, device=DEVICE)
        sk.shared_basis_lora(out, x.to(DEVICE), Up[None].to(DEVICE), Vp[None].to(DEVICE), Sp.to(DEVICE),
                             index.to(DEVICE), None, diag=diag, backend=backend, **kw)
        torch.testing.assert_close(out.cpu().double(), want, atol=1e-4, rtol=1e-4)
        # the unpadded layer (odd k) through the same op gives the same result
        ref = R.shared_basis_lora_ref(torch.zeros(T, 24), x, U[None], V[None], S, index, None, diag=diag)
        torch.testing.assert_close(ref.double(), want, atol=1e-4, rtol=1e-4)
        if backend == "triton":
            own = torch.zeros(T, 24, device=DEVICE)
            sk.shared_basis_lora(own, x.to(DEVICE), U[None].to(DEVICE), V[None].to(DEVICE), S.to(DEVICE),
                                 index.to(DEVICE), None, diag=diag, backend="triton", **kw)
            torch.testing.assert_close(own.cpu().double(), want, atol=1e-4, rtol=1e-4)
