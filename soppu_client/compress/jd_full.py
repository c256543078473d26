"""JD-Full: orthonormal shared bases U, V with full k x k cores.

    maximize  f(U, V) = sum_i w_i ||U.T dW_i V||_F^2   over U.T U = I, V.T V = I
    cores     S_i = U.T dW_i V = (B_i.T U).T (A_i V)

(for orthonormal U, V this is the same as minimizing sum_i w_i ||dW_i - U S_i V.T||_F^2.)

Alternating orthogonal iteration on the factors: with U fixed, f = tr(V.T G V) with
G = sum_i w_i A_i.T C_i C_i.T A_i and C_i = B_i.T U. One step takes the search space
Q = orth([V, G V, V_prev]) (block Krylov plus the previous basis, as in LOBPCG: about 2-3x fewer
iterations when eigenvalues k and k+1 are close) and keeps the best k-dimensional subspace of it
(Rayleigh-Ritz on Q.T G Q, at most 3k x 3k). Since V lies in span(Q) the objective never
decreases; U is updated the same way. Every heavy product is one GEMM over the stacked factors (see ``stack.py``); nothing of size
d_out x d_in is formed. Stops when the relative gain of f falls below ``tol``.
"""

from __future__ import annotations

import torch

from soppu_client.compress.init import hosvd_init
from soppu_client.compress.stack import FactorStack


def _ritz_step(
    X: torch.Tensor, XQ_cache: torch.Tensor, C: torch.Tensor, flat: torch.Tensor, w: torch.Tensor,
    X_prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One Rayleigh-Ritz update of the basis X [d, k] for f = sum_i w_i ||C_i.T M_i X||^2.

    ``flat`` is M stacked [N r, d], ``XQ_cache`` = M_i X [N, r, k], ``C`` [N, r, k] the other side.
    The search space is span[X, G X, X_prev] (LOBPCG-style: the previous basis carries momentum
    that speeds convergence when eigenvalues k and k+1 are close). Returns (new X, M_i @ new X, objective).
    """
    n, r, k = C.shape
    # G X = sum_i w_i M_i.T C_i C_i.T (M_i X)
    inner = C @ (C.transpose(1, 2) @ XQ_cache) * w.view(-1, 1, 1)  # [N, r, k]
    GX = flat.T @ inner.reshape(n * r, k)  # [d, k]
    blocks = [X, GX] if X_prev is None else [X, GX, X_prev - X @ (X.T @ X_prev)]
    Q, _ = torch.linalg.qr(torch.cat(blocks, dim=1))  # [d, 2k or 3k]
    MQ = (flat @ Q).reshape(n, r, -1)  # [N, r, 2k]
    P = MQ.transpose(1, 2) @ C * w.sqrt().view(-1, 1, 1)  # [N, 2k, k]
    P2 = P.permute(1, 0, 2).reshape(P.shape[1], -1)
    H = P2 @ P2.T  # Q.T G Q = sum_i P_i P_i.T
    evals, evecs = torch.linalg.eigh(H.double())
    top = evecs[:, -k:].flip(1).to(X.dtype)
    return Q @ top, MQ @ top, float(evals[-k:].sum())


def fit_jd_full(
    stack: FactorStack, k: int, *, tol: float = 1e-5, max_iter: int = 200, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool, list[float]]:
    """Fit (U [d_out,k], V [d_in,k], S [N,k,k]); also returns iterations, converged, objective history."""
    U, V = hosvd_init(stack, k, seed)
    w = stack.weights
    AV = stack.project_right(V)
    C = stack.project_left(U)
    history = [float((w.double() * ((C.transpose(1, 2) @ AV).double() ** 2).sum((1, 2))).sum())]
    converged = False
    it = 0
    U_prev = V_prev = None
    for it in range(1, max_iter + 1):
        V_next, AV, _ = _ritz_step(V, AV, C, stack.A_flat, w, V_prev)
        U_next, C, f = _ritz_step(U, C, AV, stack.Bt_flat, w, U_prev)
        (U_prev, U), (V_prev, V) = (U, U_next), (V, V_next)
        history.append(f)
        gain = f - history[-2]
        if abs(gain) <= tol * max(abs(f), 1e-300):
            converged = True
            break
    cores = C.transpose(1, 2) @ AV  # U.T B_i A_i V
    return U, V, cores, it, converged, history
