"""JD-Diag: shared (free, non-orthonormal) bases U, V with diagonal cores.

    minimize  E = sum_i w_i ||dW_i - U diag(s_i) V.T||_F^2

by alternating exact least squares (the CP / PARAFAC ALS updates, computed on factors):

    U <- [sum_i w_i B_i (A_i V) diag(s_i)] [(V.T V) * (S.T W S)]^-1
    V <- [sum_i w_i A_i.T (B_i.T U) diag(s_i)] [(U.T U) * (S.T W S)]^-1
    s_i <- [(U.T U) * (V.T V)]^-1 diag(U.T B_i A_i V)

(* is the elementwise product, S = [s_1; ...; s_N] is N x k, W = diag(w)). Each update minimizes E
exactly in its block, so E never increases. Columns of U and V are rescaled to unit norm after
each step (scale moves into s). After each sweep a line search extrapolates U, V along the
sweep's step and keeps the result only when E is lower (Bro's acceleration of ALS). Initialised
from the HOSVD bases; with one adapter this is already its truncated SVD. Stops when a sweep
lowers the weighted unsquared error e = sqrt(E / T), T = sum_i w_i ||dW_i||^2, by less than
``tol * e`` (JD-Full's rule).
"""

from __future__ import annotations

import torch

from soppu_client.compress.init import hosvd_init
from soppu_client.compress.stack import FactorStack


def _solve_sym(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve X M = rhs for X (M symmetric PSD, k x k), with a tiny ridge for rank-deficient M."""
    M64 = M.double()
    ridge = 1e-12 * max(float(torch.diagonal(M64).abs().max()), 1e-300)
    M64 = M64 + ridge * torch.eye(M.shape[0], dtype=torch.float64)
    return torch.linalg.solve(M64, rhs.double().T).T.to(rhs.dtype)


def _normalize(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm columns and the norms taken out (zero columns are left as they are)."""
    norms = X.norm(dim=0)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return X / norms, norms


def _sigma(C: torch.Tensor, AV: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Exact least-squares s_i for fixed U, V: [(U.T U) * (V.T V)] s_i = diag(C_i.T AV_i)."""
    M = (U.T @ U) * (V.T @ V)
    rhs = (C * AV).sum(1)  # [N, k]
    return _solve_sym(M, rhs)


def _objective(stack: FactorStack, C, AV, U, V, s) -> float:
    """sum_i w_i ||dW_i - U diag(s_i) V.T||^2 via Gram identities (float64)."""
    w = stack.weights.double()
    cross = ((C * AV).sum(1).double() * s.double()).sum(1)
    M = ((U.T @ U) * (V.T @ V)).double()
    quad = torch.einsum("nk,kl,nl->n", s.double(), M, s.double())
    return float((w * (stack.sq_norms - 2 * cross + quad)).sum())


def fit_jd_diag(
    stack: FactorStack, k: int, *, tol: float = 3e-5, max_iter: int = 300, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool, list[float]]:
    """Fit (U [d_out,k], V [d_in,k], s [N,k]); also returns iterations, converged, objective history."""
    U, V = hosvd_init(stack, k, seed)
    w = stack.weights
    AV, C = stack.project_right(V), stack.project_left(U)
    s = _sigma(C, AV, U, V)
    history = [_objective(stack, C, AV, U, V, s)]
    total = max(float((w.double() * stack.sq_norms.double()).sum()), 1e-300)
    converged = False
    it = 0
    n, r = stack.n, stack.r
    for it in range(1, max_iter + 1):
        U_prev, V_prev = U, V
        sws = (s.T * w) @ s  # S.T W S
        rhs_u = stack.Bt_flat.T @ (AV * (s * w.view(-1, 1)).unsqueeze(1)).reshape(n * r, -1)
        U, scale = _normalize(_solve_sym((V.T @ V) * sws, rhs_u))
        s = s * scale  # keeps U diag(s) V.T unchanged, so the V step starts where the U step ended
        sws = (s.T * w) @ s
        C = stack.project_left(U)
        rhs_v = stack.A_flat.T @ (C * (s * w.view(-1, 1)).unsqueeze(1)).reshape(n * r, -1)
        V, _ = _normalize(_solve_sym((U.T @ U) * sws, rhs_v))
        AV = stack.project_right(V)
        s = _sigma(C, AV, U, V)
        f = _objective(stack, C, AV, U, V, s)
        # Line search (Bro 1998): extrapolate the bases along this sweep's step; keep it only if better.
        step = it ** (1.0 / 3.0)
        U_ls, _ = _normalize(U_prev + step * (U - U_prev))
        V_ls, _ = _normalize(V_prev + step * (V - V_prev))
        C_ls, AV_ls = stack.project_left(U_ls), stack.project_right(V_ls)
        s_ls = _sigma(C_ls, AV_ls, U_ls, V_ls)
        f_ls = _objective(stack, C_ls, AV_ls, U_ls, V_ls, s_ls)
        if f_ls < f:
            U, V, C, AV, s, f = U_ls, V_ls, C_ls, AV_ls, s_ls, f_ls
        history.append(f)
        e_prev, e = (max(history[-2], 0.0) / total) ** 0.5, (max(f, 0.0) / total) ** 0.5
        if e_prev - e <= tol * e or history[-1] <= 1e-24 * max(history[0], 1e-300):
            converged = True
            break
    return U, V, s, it, converged, history
