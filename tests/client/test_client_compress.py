"""JD-Full / JD-Diag against independent dense references (numpy / scipy) on small cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from soppu_client.compress import CompressConfig, fit_module
from soppu_client.metrics import factored_sq_norm, residual_sq_norm, singular_values, svd_tail_sq


def _collection(seed: int, n: int = 5, d_out: int = 40, d_in: int = 30, ranks=(3, 4, 5, 4, 3), shared: int = 6):
    """Adapters with partly shared row/column spaces (as real collections have) plus noise."""
    rng = np.random.default_rng(seed)
    Ub, Vb = rng.standard_normal((d_out, shared)), rng.standard_normal((d_in, shared))
    out = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        B = Ub @ rng.standard_normal((shared, r)) + 0.5 * rng.standard_normal((d_out, r))
        A = rng.standard_normal((r, shared)) @ Vb.T + 0.5 * rng.standard_normal((r, d_in))
        out.append((A * (i + 1), B))  # different norms per adapter
    return out


def _dense_errors(factors, fit):
    errs = []
    for i, (A, B) in enumerate(factors):
        c = fit.cluster_of[i]
        U, V, S = fit.U[c].double().numpy(), fit.V[c].double().numpy(), fit.cores[i].double().numpy()
        S = np.diag(S) if S.ndim == 1 else S
        dW = B @ A
        errs.append(np.linalg.norm(dW - U @ S @ V.T) / np.linalg.norm(dW))
    return np.array(errs)


def _dense_svd_bound(factors, k):
    out = []
    for A, B in factors:
        s = scipy.linalg.svdvals(B @ A)
        out.append(np.sqrt((s[k:] ** 2).sum() / (s**2).sum()))
    return np.array(out)


@pytest.mark.parametrize("method", ["full", "diag"])
def test_factored_metrics_equal_dense(method):
    factors = _collection(0)
    fit = fit_module(factors, CompressConfig(rank=5, method=method, float64=True))
    for i, (A, B) in enumerate(factors):
        U, V, S = fit.U[0].numpy(), fit.V[0].numpy(), fit.cores[i].numpy()
        dense_S = np.diag(S) if S.ndim == 1 else S
        dW = B @ A
        assert abs(factored_sq_norm(A, B) - np.linalg.norm(dW) ** 2) <= 1e-9 * np.linalg.norm(dW) ** 2
        dense = np.linalg.norm(dW - U @ dense_S @ V.T) / np.linalg.norm(dW)
        ours = np.sqrt(residual_sq_norm(A, B, U, S, V) / factored_sq_norm(A, B))
        assert dense > 0.01  # non-trivial residual
        assert abs(ours - dense) < 1e-6
        np.testing.assert_allclose(singular_values(A, B), scipy.linalg.svdvals(dW)[: A.shape[0]], rtol=1e-9, atol=1e-9)


def test_factored_error_is_accurate_when_tiny():
    """The near-exact regime, where Gram identities cancel, still agrees with dense to 1e-6."""
    factors = _collection(1)
    fit = fit_module(factors, CompressConfig(rank=sum(a.shape[0] for a, _ in factors), float64=True))
    for i, (A, B) in enumerate(factors):
        U, V, S = fit.U[0].numpy(), fit.V[0].numpy(), fit.cores[i].numpy()
        dense = np.linalg.norm(B @ A - U @ S @ V.T) / np.linalg.norm(B @ A)
        ours = np.sqrt(residual_sq_norm(A, B, U, S, V) / factored_sq_norm(A, B))
        assert dense < 1e-10 and abs(ours - dense) < 1e-9


@pytest.mark.parametrize("method", ["full", "diag"])
@pytest.mark.parametrize("k", [2, 5, 9])
def test_svd_lower_bound_holds(method, k):
    factors = _collection(2)
    fit = fit_module(factors, CompressConfig(rank=k, method=method, float64=True))
    errors = _dense_errors(factors, fit)
    bound = _dense_svd_bound(factors, k)
    assert np.all(errors >= bound - 1e-9), (errors, bound)
    assert np.all(errors > 0)
    np.testing.assert_allclose([np.sqrt(svd_tail_sq(A, B, k) / factored_sq_norm(A, B)) for A, B in factors], bound, atol=1e-9)


def test_rank_at_least_sum_of_ranks_is_exact():
    factors = _collection(3)
    total = sum(a.shape[0] for a, _ in factors)
    fit = fit_module(factors, CompressConfig(rank=total, float64=True))
    assert _dense_errors(factors, fit).max() < 1e-8
    # and one dimension less is not exact: the test can fail
    fit = fit_module(factors, CompressConfig(rank=total - 2, float64=True))
    assert _dense_errors(factors, fit).max() > 1e-4


@pytest.mark.parametrize("method", ["full", "diag"])
def test_single_adapter_matches_its_truncated_svd(method):
    (A, B), = _collection(4, n=1, ranks=(6,))
    dW = B @ A
    s = scipy.linalg.svdvals(dW)
    # k >= r reconstructs exactly
    fit = fit_module([(A, B)], CompressConfig(rank=6, method=method, float64=True))
    assert _dense_errors([(A, B)], fit)[0] < 1e-8
    # k < r gives exactly the rank-k SVD error, and JD-Diag's core holds the top singular values
    fit = fit_module([(A, B)], CompressConfig(rank=3, method=method, float64=True))
    assert abs(_dense_errors([(A, B)], fit)[0] - np.sqrt((s[3:] ** 2).sum() / (s**2).sum())) < 1e-8
    if method == "diag":
        U, V = fit.U[0].numpy(), fit.V[0].numpy()
        scale = np.linalg.norm(U, axis=0) * np.linalg.norm(V, axis=0)
        np.testing.assert_allclose(np.sort(np.abs(fit.cores[0].numpy()) * scale)[::-1], s[:3], rtol=1e-7)


@pytest.mark.parametrize("method", ["full", "diag"])
def test_objective_is_monotone(method):
    factors = _collection(5, n=8)
    fit = fit_module(factors, CompressConfig(rank=4, method=method, float64=True, tol=1e-12, max_iter=60))
    h = np.array(fit.history[0])
    assert len(h) > 3
    steps = np.diff(h) if method == "full" else -np.diff(h)
    assert np.all(steps >= -1e-10 * np.abs(h[1:])), h  # full maximizes, diag minimizes
    assert (h[-1] > h[0]) if method == "full" else (h[-1] < h[0])


def _weighted_error(factors, U, V, weighting="equal"):
    """sum_i w_i ||dW_i - U U.T dW_i V V.T||^2 for orthonormal U, V (dense); w_i = 1 / ||dW_i||^2
    (equal) or 1 (norm)."""
    total = 0.0
    for A, B in factors:
        dW = B @ A
        w = 1.0 / np.linalg.norm(dW) ** 2 if weighting == "equal" else 1.0
        total += w * np.linalg.norm(dW - U @ (U.T @ dW @ V) @ V.T) ** 2
    return total


@pytest.mark.parametrize("weighting", ["equal", "norm"])
def test_jd_full_beats_random_basis_and_stacked_svd(weighting):
    factors = _collection(6, n=6)
    k = 5
    fit = fit_module(factors, CompressConfig(rank=k, float64=True, tol=1e-10, weighting=weighting))
    ours = _weighted_error(factors, fit.U[0].numpy(), fit.V[0].numpy(), weighting)
    rng = np.random.default_rng(0)
    Ur, _ = np.linalg.qr(rng.standard_normal((40, k)))
    Vr, _ = np.linalg.qr(rng.standard_normal((30, k)))
    random_basis = _weighted_error(factors, Ur, Vr, weighting)
    # plain SVD of the stacked factors: U from [B_1 .. B_N], V from [A_1.T .. A_N.T]
    Us = np.linalg.svd(np.hstack([B for _, B in factors]), full_matrices=False)[0][:, :k]
    Vs = np.linalg.svd(np.hstack([A.T for A, _ in factors]), full_matrices=False)[0][:, :k]
    stacked = _weighted_error(factors, Us, Vs, weighting)
    assert ours < stacked < random_basis
    assert ours < 0.97 * stacked


def test_deterministic_for_a_seed():
    factors = _collection(7)
    a = fit_module(factors, CompressConfig(rank=4, seed=3))
    b = fit_module(factors, CompressConfig(rank=4, seed=3))
    assert np.array_equal(a.U[0].numpy(), b.U[0].numpy()) and np.array_equal(a.cores.numpy(), b.cores.numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "`rank` should be a positive integer, but the value passed is 0"),
        ({"method": "svd"}, "`method` should be one of full, diag, but the value passed is 'svd'"),
        ({"weighting": "x"}, "`weighting` should be one of equal, norm, but the value passed is 'x'"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    from soppu_client.format.errors import InputError

    with pytest.raises(InputError) as info:
        CompressConfig(**kwargs)
    assert str(info.value) == message


def test_module_metrics_on_the_fits_float32_stack_equal_dense():
    """Metrics from the fit's own float32 stack (what ``soppu compress`` passes: one GEMM per cluster,
    no float64 copy) equal dense numpy: errors to 1e-5 where the float32 products are trusted, and to
    1e-9 for the near-exact adapters recomputed in float64; lower bounds to 1e-9."""
    import torch

    from soppu_client.compress import stack_factors
    from soppu_client.metrics import module_metrics

    factors = [(a.astype(np.float32), b.astype(np.float32)) for a, b in _collection(9, n=6, d_out=300, d_in=200)]
    cluster_of = [0, 1, 0, 1, 1, 0]
    k = 4
    fits = [fit_module([f for f, c in zip(factors, cluster_of) if c == j], CompressConfig(rank=kj, max_iter=50))
            for j, kj in ((0, 12), (1, k))]  # cluster 0 near-exact (k >= ranks), cluster 1 not
    U = [f.U[0].double().numpy() for f in fits]
    V = [f.V[0].double().numpy() for f in fits]
    per_cluster = {0: iter(fits[0].cores.double().numpy()), 1: iter(fits[1].cores.double().numpy())}
    cores = [next(per_cluster[c]) for c in cluster_of]
    stack = stack_factors(factors, dtype=torch.float32)
    m = module_metrics("m", factors, U, V, cores, cluster_of, k, stack=stack)
    m64 = module_metrics("m", factors, U, V, cores, cluster_of, k)  # no stack: float64 products
    for i, ((A, B), c) in enumerate(zip(factors, cluster_of)):
        A, B = A.astype(np.float64), B.astype(np.float64)
        dW = B @ A
        dense = np.linalg.norm(dW - U[c] @ cores[i] @ V[c].T) / np.linalg.norm(dW)
        assert abs(m.error[i] - dense) < (1e-9 if c == 0 else 1e-5 * dense), (i, m.error[i], dense)
        assert abs(m64.error[i] - dense) < 1e-9 * max(dense, 1.0)
        s = scipy.linalg.svdvals(dW)
        assert abs(m.lower_bound[i] - np.sqrt((s[k:] ** 2).sum() / (s**2).sum())) < 1e-9
    assert m.error[[0, 2, 5]].max() < 1e-3 and m.error[[1, 3, 4]].min() > 0.05  # both regimes occur
    # the trusted adapters really came from float32 products (they differ from float64 in the last digits)
    assert np.any(m.sq_residual[[1, 3, 4]] != m64.sq_residual[[1, 3, 4]])


def test_batched_module_metrics_equal_dense_per_adapter():
    """module_metrics (batched, padded ranks, clusters, near-exact fallback) == dense numpy."""
    from soppu_client.metrics import module_metrics

    factors = _collection(8, n=5)
    cluster_of = [0, 1, 0, 1, 1]
    fits = [fit_module([f for f, c in zip(factors, cluster_of) if c == j], CompressConfig(rank=k, float64=True))
            for j, k in ((0, 12), (1, 4))]  # cluster 0 is exact (k >= ranks), cluster 1 is not
    k = 4
    U = [np.pad(fits[0].U[0].numpy(), ((0, 0), (0, 0))), fits[1].U[0].numpy()]
    V = [fits[0].V[0].numpy(), fits[1].V[0].numpy()]
    per_cluster = {0: iter(fits[0].cores.numpy()), 1: iter(fits[1].cores.numpy())}
    cores = [next(per_cluster[c]) for c in cluster_of]
    m = module_metrics("m", factors, U, V, cores, cluster_of, k)
    for i, ((A, B), c) in enumerate(zip(factors, cluster_of)):
        dW = B @ A
        dense = np.linalg.norm(dW - U[c] @ cores[i] @ V[c].T) / np.linalg.norm(dW)
        assert abs(m.error[i] - dense) < 1e-6
        s = scipy.linalg.svdvals(dW)
        assert abs(m.lower_bound[i] - np.sqrt((s[k:] ** 2).sum() / (s**2).sum())) < 1e-9
    assert m.error[0] < 1e-9 and m.error[1] > 0.01
