"""JD-Full: orthonormal shared bases U, V with full k x k cores.

    maximize  f(U, V) = sum_i w_i ||U.T dW_i V||_F^2   over U.T U = I, V.T V = I
    cores     S_i = U.T dW_i V = (B_i.T U).T (A_i V)

For orthonormal U, V, sum_i w_i ||dW_i - U S_i V.T||_F^2 = T - f with T = sum_i w_i ||dW_i||_F^2,
so the weighted unsquared relative error is e = sqrt(1 - f / T).

Alternating block LOBPCG on the factors. With U fixed, f = tr(V.T G V) with
G = sum_i w_i A_i.T C_i C_i.T A_i and C_i = B_i.T U. A half step searches span[V, W, P]:
W = (I - V V.T) G V (the residual block) and P, the last step's direction (momentum, as in LOBPCG:
span[V, P] = span[V, V_prev]; about 2-3x fewer iterations when eigenvalues k and k+1 are close),
both orthonormalized, and keeps
the best k-dimensional subspace of it (Rayleigh-Ritz on Q.T G Q, at most 3k x 3k). V stays in the
search space, so f never decreases; U is updated the same way.

Cost: with M one side's stacked factors ([N r, d], ``stack.py``), a half step multiplies by M
twice, k columns each: G V = M.T (...) and M W. M V and M P are carried as linear combinations of
earlier products (the Ritz coefficients; measured drift ~1e-6 relative after 60 iterations in
float32), recomputed exactly every ``_REFRESH`` iterations. Nothing of size d_out x d_in is formed.
Start: U from the HOSVD range finder (``init.py``), V random; the first half step makes V the best
match for U within span[V, G V].

Stopping rule, on what the user sees: stop when one iteration lowers e by less than ``tol * e``.
"""

from __future__ import annotations

import torch

from soppu_client.compress.init import hosvd_init
from soppu_client.compress.stack import FactorStack

_REFRESH = 20  # iterations between exact recomputations of the carried products M X


def _orthonormalize(Y: torch.Tensor, MY: torch.Tensor | None, bases: list[tuple[torch.Tensor, torch.Tensor | None]],
                    floor: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal columns spanning (I - X X.T) Y for the orthonormal X in ``bases``, dropping
    directions of norm <= ``floor``; the same linear map is applied to MY (= M Y) when given."""

    def project(Y, MY):
        for X, MX in bases:
            c = X.T @ Y
            Y = Y - X @ c
            MY = None if MY is None else MY - MX @ c
        return Y, MY

    Y, MY = project(*project(Y, MY))  # classical Gram-Schmidt, twice
    _, s, vh = torch.linalg.svd(Y, full_matrices=False)
    keep = s > floor
    T = vh[keep].T / s[keep]
    Y, MY = project(Y @ T, None if MY is None else MY @ T)  # once more: the rescaling amplifies leftovers
    Q, R = torch.linalg.qr(Y)  # R is within rounding of orthogonal here
    return Q, None if MY is None else torch.linalg.solve_triangular(R, MY, upper=True, left=False)


def _half_step(
    M: torch.Tensor, X: torch.Tensor, MX: torch.Tensor, C: torch.Tensor, w: torch.Tensor,
    prev: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, float, tuple[torch.Tensor, torch.Tensor]]:
    """Rayleigh-Ritz update of X [d, k] for f = sum_i w_i ||C_i.T M_i X||^2.

    ``M`` is this side's factors stacked [N r, d], ``MX`` = M X [N r, k], ``C`` [N, r, k] the other
    side's projection, ``prev`` = (P, M P), the last step's direction, or None. Returns the new X,
    M X, objective and (P, M P) for the next step.
    """
    n, r, k = C.shape
    eps = torch.finfo(X.dtype).eps
    inner = C @ (C.transpose(1, 2) @ MX.view(n, r, -1)) * w.view(-1, 1, 1)  # [N, r, k]
    GX = M.T @ inner.reshape(n * r, -1)  # [d, k]   (product 1)
    W, _ = _orthonormalize(GX, None, [(X, MX)], 1e3 * eps * float(GX.norm()))
    blocks, products = [X, W], [MX, M @ W]  # (product 2)
    if prev is not None:  # momentum: M P is carried (a combination of earlier products), no product
        P, MP = _orthonormalize(prev[0], prev[1], [(X, MX), (W, products[1])], eps**0.5)
        blocks.append(P)
        products.append(MP)
    Q, MQ = torch.cat(blocks, dim=1), torch.cat(products, dim=1)
    Tq = (C.transpose(1, 2) @ MQ.view(n, r, -1)).double() * w.double().sqrt().view(-1, 1, 1)  # [N, k, m]
    Tq = Tq.reshape(-1, Tq.shape[2])
    evals, evecs = torch.linalg.eigh(Tq.T @ Tq)  # Q.T G Q, at most 3k x 3k
    top = evecs[:, -k:].flip(1).to(X.dtype)
    # LOBPCG's direction P = (new X) - X top[:k], taken from the W and P blocks: no cancellation
    step = (Q[:, k:] @ top[k:], MQ[:, k:] @ top[k:])
    return Q @ top, MQ @ top, float(evals[-k:].sum()), step


def _reorthonormalize(X: torch.Tensor, MX: torch.Tensor, M: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo rounding drift: X = Q R -> Q, and M Q exactly (with M) or as MX R^-1 (R ~ I here)."""
    Q, R = torch.linalg.qr(X)
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)  # keep each column's direction
    Q, R = Q * sign, R * sign.unsqueeze(1)
    return Q, (M @ Q) if M is not None else torch.linalg.solve_triangular(R, MX, upper=True, left=False)


def weighted_error(f: float, total: float) -> float:
    """e = sqrt(1 - f / T), the weighted unsquared relative error of an orthonormal fit."""
    return max(1.0 - f / total, 0.0) ** 0.5 if total > 0 else 0.0


def fit_jd_full(
    stack: FactorStack, k: int, *, tol: float = 3e-5, max_iter: int = 200, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool, list[float]]:
    """Fit (U [d_out,k], V [d_in,k], S [N,k,k]); also returns iterations, converged, objective history.

    ``tol``: stop when an iteration lowers the weighted unsquared error e by less than ``tol * e``.
    """
    U, V = hosvd_init(stack, k, seed, right=False)
    w = stack.weights
    A, Bt = stack.A_flat, stack.Bt_flat
    AV, BU = A @ V, Bt @ U  # [N r, k]
    n, r = stack.n, stack.r
    total = float((w.double() * stack.sq_norms.double()).sum())
    floor = torch.finfo(U.dtype).eps ** 0.5  # below this, e is rounding noise at this precision
    history = [float((w.double() * ((BU.view(n, r, -1).transpose(1, 2) @ AV.view(n, r, -1)).double() ** 2)
                      .sum((1, 2))).sum())]
    converged = False
    it = 0
    U_prev = V_prev = None
    for it in range(1, max_iter + 1):
        V, AV, _, V_prev = _half_step(A, V, AV, BU.view(n, r, -1), w, V_prev)
        U, BU, f, U_prev = _half_step(Bt, U, BU, AV.view(n, r, -1), w, U_prev)
        if it % _REFRESH == 0:
            (U, BU), (V, AV) = _reorthonormalize(U, BU, Bt), _reorthonormalize(V, AV, A)
        history.append(f)
        e_prev, e = weighted_error(history[-2], total), weighted_error(f, total)
        if e_prev - e <= tol * e or e <= floor:
            converged = True
            break
    (U, BU), (V, AV) = _reorthonormalize(U, BU), _reorthonormalize(V, AV)
    cores = BU.view(n, r, -1).transpose(1, 2) @ AV.view(n, r, -1)  # U.T B_i A_i V
    return U, V, cores, it, converged, history
