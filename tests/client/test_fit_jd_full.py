"""JD-Full's fit, init, stacking and stopping rule against dense numpy references on small cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soppu_client.compress import CompressConfig, fit_module
from soppu_client.compress import jd_full
from soppu_client.compress.init import hosvd_init
from soppu_client.compress.stack import stack_factors


def _collection(seed: int, n: int = 7, d_out: int = 48, d_in: int = 36, r: int = 4, shared: int = 5, noise=0.4):
    rng = np.random.default_rng(seed)
    Ub, Vb = rng.standard_normal((d_out, shared)), rng.standard_normal((d_in, shared))
    out = []
    for i in range(n):
        B = Ub @ rng.standard_normal((shared, r)) + noise * rng.standard_normal((d_out, r))
        A = rng.standard_normal((r, shared)) @ Vb.T + noise * rng.standard_normal((r, d_in))
        out.append((A * (1 + i % 3), B))
    return out


def _weights(factors, weighting):
    sq = np.array([np.linalg.norm(B @ A) ** 2 for A, B in factors])
    return (1 / sq) / (1 / sq).sum() * len(factors) if weighting == "equal" else np.ones(len(factors))


def _top_eigvecs(G, k):
    vals, vecs = np.linalg.eigh(G)
    return vecs[:, -k:], vals[-k:].sum()


def _subspace_gap(X, Y):
    """||X - Y Y.T X||_2: sin of the largest principal angle between span(X) and span(Y) (orthonormal)."""
    return float(np.linalg.norm(X - Y @ (Y.T @ X), 2))


@pytest.mark.parametrize("weighting", ["equal", "norm"])
def test_fit_is_a_stationary_point_of_the_dense_problem(weighting):
    """At convergence U spans the top-k eigenspace of sum_i w_i dW_i V V.T dW_i.T (dense), V likewise,
    and the cores are U.T dW_i V."""
    factors = _collection(0)
    k = 4
    fit = fit_module(factors, CompressConfig(rank=k, weighting=weighting, float64=True, tol=1e-13, max_iter=2000))
    U, V = fit.U[0].numpy(), fit.V[0].numpy()
    w = _weights(factors, weighting)
    dWs = [B @ A for A, B in factors]
    assert fit.converged[0] and fit.iterations[0] > 2  # non-vacuous: it had to iterate
    G_U = sum(wi * dW @ V @ V.T @ dW.T for wi, dW in zip(w, dWs))
    G_V = sum(wi * dW.T @ U @ U.T @ dW for wi, dW in zip(w, dWs))
    U_best, f_best = _top_eigvecs(G_U, k)
    V_best, _ = _top_eigvecs(G_V, k)
    assert _subspace_gap(U, U_best) < 1e-5 and _subspace_gap(V, V_best) < 1e-5
    f = sum(wi * np.linalg.norm(U.T @ dW @ V) ** 2 for wi, dW in zip(w, dWs))
    assert abs(f - f_best) <= 1e-9 * f_best
    assert abs(fit.history[0][-1] - f) <= 1e-9 * f
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-12)
    for i, dW in enumerate(dWs):
        np.testing.assert_allclose(fit.cores[i].numpy(), U.T @ dW @ V, rtol=1e-9, atol=1e-12 * np.linalg.norm(dW))


def test_recovers_an_exactly_shared_basis():
    rng = np.random.default_rng(1)
    k, d_out, d_in = 3, 30, 20
    Ut, _ = np.linalg.qr(rng.standard_normal((d_out, k)))
    Vt, _ = np.linalg.qr(rng.standard_normal((d_in, k)))
    factors = []
    for _ in range(6):  # dW_i = Ut S_i Vt.T, stored as rank-5 factors with a redundant part
        S = rng.standard_normal((k, k))
        B = np.hstack([Ut @ S, np.zeros((d_out, 2))]) + 0.0
        A = np.vstack([Vt.T, rng.standard_normal((2, d_in))])
        factors.append((A, B))
    fit = fit_module(factors, CompressConfig(rank=k, float64=True))
    assert _subspace_gap(fit.U[0].numpy(), Ut) < 1e-8 and _subspace_gap(fit.V[0].numpy(), Vt) < 1e-8
    for i, (A, B) in enumerate(factors):
        dW = B @ A
        U, V = fit.U[0].numpy(), fit.V[0].numpy()
        assert np.linalg.norm(dW - U @ fit.cores[i].numpy() @ V.T) < 1e-10 * np.linalg.norm(dW)


def test_stopping_rule_is_on_the_unsquared_error():
    """It stops at the first iteration that lowers e = sqrt(sum w ||R||^2 / sum w ||dW||^2) (dense)
    by less than tol * e, and the e it tracked is the dense one."""
    factors = _collection(2, n=9, noise=1.0)
    tol = 1e-3
    fit = fit_module(factors, CompressConfig(rank=3, weighting="norm", float64=True, tol=tol))
    w = _weights(factors, "norm")
    total = sum(wi * np.linalg.norm(B @ A) ** 2 for wi, (A, B) in zip(w, factors))
    e = np.array([jd_full.weighted_error(f, total) for f in fit.history[0]])
    drops = (e[:-1] - e[1:]) / e[1:]
    assert len(e) >= 3 and drops[-1] <= tol and np.all(drops[:-1] > tol), drops
    U, V = fit.U[0].numpy(), fit.V[0].numpy()
    dense = np.sqrt(sum(wi * np.linalg.norm(B @ A - U @ fit.cores[i].numpy() @ V.T) ** 2
                        for i, (wi, (A, B)) in enumerate(zip(w, factors))) / total)
    assert abs(dense - e[-1]) < 1e-10
    # a tighter tolerance iterates longer and does not end worse
    tight = fit_module(factors, CompressConfig(rank=3, weighting="norm", float64=True, tol=1e-8))
    assert tight.iterations[0] > fit.iterations[0]
    assert jd_full.weighted_error(tight.history[0][-1], total) <= e[-1] + 1e-12


@pytest.mark.parametrize("case", ["no refresh", "converged, across refreshes"])
def test_carried_products_stay_exact_over_many_iterations(monkeypatch, case):
    """M X and M P are carried as combinations of earlier products; after many float32 iterations
    (without the periodic exact recompute, or long past convergence where the steps are rounding
    noise) the returned cores still equal U.T dW_i V and the bases stay orthonormal."""
    if case == "no refresh":
        monkeypatch.setattr(jd_full, "_REFRESH", 10**6)
        factors, k = _collection(3, n=12, noise=2.0), 4
    else:
        rng = np.random.default_rng(1)
        factors, k = [(rng.standard_normal((4, 30)), rng.standard_normal((25, 4))) for _ in range(5)], 6
    factors = [(a.astype(np.float32), b.astype(np.float32)) for a, b in factors]
    stack = stack_factors(factors, "norm", torch.float32)
    U, V, S, it, _, _ = jd_full.fit_jd_full(stack, k, tol=-1.0, max_iter=80)  # tol < 0: never stops early
    assert it == 80
    U, V = U.double().numpy(), V.double().numpy()
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-5)
    for i, (A, B) in enumerate(factors):
        dense = U.T @ (B.astype(np.float64) @ A) @ V
        assert np.linalg.norm(S[i].double().numpy() - dense) <= 1e-5 * np.linalg.norm(dense)


@pytest.mark.parametrize("d_out, n", [(40, 5), (700, 60)])  # dense SVD path, randomized path
def test_init_left_basis_is_the_dense_hosvd(d_out, n):
    rng = np.random.default_rng(4)
    shared, r, k, d_in = 6, 4, 4, 50
    Ub = rng.standard_normal((d_out, shared)) * np.array([8, 6, 5, 4, 0.3, 0.2])
    factors = [(rng.standard_normal((r, d_in)), Ub @ rng.standard_normal((shared, r)) + 0.05 * rng.standard_normal((d_out, r)))
               for _ in range(n)]
    stack = stack_factors(factors, "equal", torch.float64)
    U, V = hosvd_init(stack, k, seed=0)
    w = _weights(factors, "equal")
    X = np.hstack([np.sqrt(wi) * (B @ A) for wi, (A, B) in zip(w, factors)])
    U_dense = np.linalg.svd(X, full_matrices=False)[0][:, :k]
    assert _subspace_gap(U.numpy(), U_dense) < (1e-8 if d_out == 40 else 1e-3)
    Y = np.hstack([np.sqrt(wi) * (B @ A).T for wi, (A, B) in zip(w, factors)])
    V_dense = np.linalg.svd(Y, full_matrices=False)[0][:, :k]
    assert _subspace_gap(V.numpy(), V_dense) < (1e-8 if d_out == 40 else 1e-3)
    U2, V2 = hosvd_init(stack, k, seed=0, right=False)  # JD-Full's start: same U, random orthonormal V
    np.testing.assert_allclose(U2.numpy(), U.numpy())
    np.testing.assert_allclose(V2.numpy().T @ V2.numpy(), np.eye(k), atol=1e-12)
    assert _subspace_gap(V2.numpy(), V_dense) > 0.5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_stack_norms_and_grams_equal_dense(dtype, tol):
    factors = _collection(5, n=4)
    factors[1] = (factors[1][0][:2], factors[1][1][:, :2])  # a lower rank, zero-padded in the stack
    stack = stack_factors(factors, "equal", dtype)
    gram_A, gram_B = stack.grams()
    for i, (A, B) in enumerate(factors):
        r = A.shape[0]
        assert abs(float(stack.sq_norms[i]) - np.linalg.norm(B @ A) ** 2) <= tol * np.linalg.norm(B @ A) ** 2
        np.testing.assert_allclose(gram_A[i, :r, :r].double().numpy(), A @ A.T, rtol=tol, atol=tol * np.abs(A @ A.T).max())
        np.testing.assert_allclose(gram_B[i, :r, :r].double().numpy(), B.T @ B, rtol=tol, atol=tol * np.abs(B.T @ B).max())
    sub = stack.subset([2, 0])
    np.testing.assert_array_equal(sub.grams()[0].numpy(), gram_A[[2, 0]].numpy())
    assert float(stack.weights.double().sum()) == pytest.approx(4.0)


def test_fit_threads_one_thread_for_small_stacks_and_restored() -> None:
    """Small stacks run on one torch thread (latency-bound ops, see compress/threads.py); large ones
    keep the setting; the setting is restored after the block, also when it raises."""
    from soppu_client.compress.threads import SMALL_STACK_ELEMENTS, fit_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with fit_threads(SMALL_STACK_ELEMENTS - 1) as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with fit_threads(SMALL_STACK_ELEMENTS) as n:
            assert n == 2 and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with fit_threads(10):
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
