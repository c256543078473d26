"""The quantizer (compress/quantize.py) against dense numpy references on small cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soppu_client.compress import CompressConfig, fit_module
from soppu_client.compress.quantize import quantize_matrix, quantize_module, weighted_sq_residual
from soppu_client.compress.stack import stack_factors
from soppu_client.format.quant import QuantSpec


def _collection(seed: int = 0, n: int = 6, d_out: int = 70, d_in: int = 50, r: int = 5):
    """Adapters sharing part of their subspaces (so a shared basis captures much, not all)."""
    rng = np.random.default_rng(seed)
    B0, A0 = rng.standard_normal((d_out, 3)), rng.standard_normal((3, d_in))
    out = []
    for _ in range(n):
        A = np.concatenate([A0 + 0.3 * rng.standard_normal((3, d_in)), rng.standard_normal((r - 3, d_in))])
        B = np.concatenate([B0 + 0.3 * rng.standard_normal((d_out, 3)), 0.3 * rng.standard_normal((d_out, r - 3))], 1)
        out.append((A.astype(np.float32), (0.1 * B).astype(np.float32)))
    return out


def _dense_errors(factors, U, V, cores) -> np.ndarray:
    """||dW_i - U S_i V.T||_F / ||dW_i||_F with every matrix formed densely (float64)."""
    out = []
    for (A, B), S in zip(factors, cores):
        dW = B.astype(np.float64) @ A.astype(np.float64)
        out.append(np.linalg.norm(dW - U @ S @ V.T) / np.linalg.norm(dW))
    return np.array(out)


@pytest.fixture(scope="module")
def fitted():
    factors = _collection()
    fit = fit_module(factors, CompressConfig(rank=6, weighting="norm"))
    return factors, fit, stack_factors(factors, "norm", torch.float64)


def test_stored_values_sit_on_the_grid_and_residual_matches_dense(fitted) -> None:
    factors, fit, stack = fitted
    q = quantize_module(stack, fit, QuantSpec(3, 16), QuantSpec(4, 64))
    U, V = q.U_values[0], q.V_values[0]
    # every basis column group is scale * integer in [-4, 3]
    scale = q.U[0].scale.astype(np.float64)
    levels = U / np.repeat(scale, 16, axis=0)[: U.shape[0]]
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-6)
    assert levels.min() >= -4 and levels.max() <= 3
    dense = _dense_errors(factors, U, V, q.core_values)
    sq_norm = np.array([np.linalg.norm(b.astype(np.float64) @ a) ** 2 for a, b in factors])
    factored = weighted_sq_residual(stack, q.U_values, q.V_values, q.core_values, fit.cluster_of)
    np.testing.assert_allclose(np.sqrt(factored / sq_norm), dense, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_aware_rounding_beats_naive_absmax(fitted, bits: int) -> None:
    factors, fit, stack = fitted
    U0, V0 = fit.U[0].double().numpy(), fit.V[0].double().numpy()
    unquantized = _dense_errors(factors, U0, V0, [c.double().numpy() for c in fit.cores])
    errs = {}
    for rounding in ("absmax", "gptq"):
        q = quantize_module(stack, fit, QuantSpec(bits, 32), QuantSpec(bits, 64), rounding=rounding)
        errs[rounding] = _dense_errors(factors, q.U_values[0], q.V_values[0], q.core_values)
    # non-vacuous: naive rounding does cost accuracy at this width
    assert errs["absmax"].mean() > unquantized.mean() + 1e-3
    assert errs["gptq"].mean() <= errs["absmax"].mean()
    assert errs["gptq"].mean() >= unquantized.mean() - 1e-9  # the fit at float precision is the floor here


def test_gptq_column_compensation_lowers_the_weighted_error() -> None:
    """tr(dX H dX.T) with H correlated: GPTQ beats clip-searched rounding of every column alone."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 8))
    M = rng.standard_normal((8, 8))
    H = M @ M.T + 0.1 * np.eye(8)
    spec = QuantSpec(2, 8)

    def cost(codes, scales):
        Xq = np.repeat(scales.astype(np.float64), 8, axis=0)[:40] * (codes.astype(np.float64) - spec.zero)
        D = X - Xq
        return float(np.trace(D @ H @ D.T))

    alone = cost(*quantize_matrix(X, spec, None))
    gptq = cost(*quantize_matrix(X, spec, H))
    naive = cost(*quantize_matrix(X, spec, None, rounding="absmax"))
    assert gptq < alone <= naive * 1.0000001
