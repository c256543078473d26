"""Constants and helpers shared by the compressed-mode tests."""

from __future__ import annotations

import math
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
N_LAYERS = 2
MODULES = [f"model.layers.{i}.self_attn.{t}" for i in range(N_LAYERS) for t in ("q_proj", "v_proj")]

# lambda of the probabilistic bound in matmul_tolerance: 2 K exp(-lambda^2 / 2) ~ 1e-11 per dot
# product of length K = 576, so even over 1e5 compared outputs a pass by chance is ~1e-6 unlikely to fail.
ROUNDING_LAMBDA = 8.0


def peft_layer(model, module: str):
    i, t = int(module.split(".")[2]), module.split(".")[-1]
    return getattr(model.base_model.model.model.layers[i].self_attn, t)


def abs_product(*factors: torch.Tensor) -> torch.Tensor:
    """|F1| @ |F2| @ ...: an elementwise bound on |F1 @ F2 @ ...| (a 1-D factor is a diagonal)."""
    out = None
    for f in factors:
        f = f.detach().double().abs()
        f = torch.diag(f) if f.dim() == 1 else f
        out = f if out is None else out @ f
    return out


def matmul_tolerance(x: torch.Tensor, weight_abs: torch.Tensor, *, c: float = ROUNDING_LAMBDA) -> dict[str, float]:
    """``rtol`` / ``atol`` for ``torch.testing.assert_close`` between two float computations of
    ``y = x @ W.T`` that differ only in rounding: summation order (another GEMM blocking, another
    batch size), or the association of a low-rank product (``U @ (S @ (V.T @ x))`` against
    ``(x @ A.T) @ B.T`` with ``B = U @ S`` rounded once).

    ``x``: [T, K], its dtype sets eps = ``torch.finfo(x.dtype).eps`` (unit roundoff u = eps / 2);
    ``weight_abs``: [d_out, K], an elementwise bound on |W| (e.g. ``W.abs() + abs_product(U, S, V.T)``
    for a base weight plus a factored delta: every intermediate of either order is bounded by it).

    A length-K dot product summed in floating point has, with probability at least
    1 - 2 K exp(-lambda^2 / 2) under the usual model of independent roundings (Higham & Mary,
    "A new approach to probabilistic rounding error analysis", SISC 2019),

        |fl(y) - y| <= lambda * sqrt(K) * u * sum_k |x_k| |W_jk|

    (the worst case grows with K, not sqrt(K), and is not met in practice). Two computations differ
    by at most twice that, so with c = lambda and the largest such sum over the outputs compared,

        atol = c * eps * sqrt(K) * max_{t,j} (|x| @ weight_abs.T)[t, j]
        rtol = c * eps * sqrt(K)

    rtol is the same bound for well-conditioned outputs (|y| ~ sum |x||W|); atol alone already covers
    every output, whatever its cancellation. Reductions shorter than K (the rank k of a core) add
    terms of the same form with a smaller sqrt, so K is the longest reduction, x.shape[-1].
    """
    eps = torch.finfo(x.dtype).eps
    k = x.shape[-1]
    scale = float((x.detach().double().abs() @ weight_abs.double().T).max())
    factor = c * eps * math.sqrt(k)
    return {"rtol": factor, "atol": factor * scale}
