"""HOSVD-style initialisation of a shared basis from stacked factors.

The k leading left singular vectors of [sqrt(w_1) dW_1, ..., sqrt(w_N) dW_N] span the best
common column space. On factors: with A_i.T = Q_i R_i (thin QR), dW_i dW_i.T = B_i R_i.T R_i B_i.T,
so the same vectors are the left singular vectors of X = [sqrt(w_i) B_i R_i.T]_i, a
d_out x (N r) matrix that never forms a d_out x d_in product. The right side is symmetric.
"""

from __future__ import annotations

import torch

from soppu_client.compress.stack import FactorStack

_EXACT_LIMIT = 5e8  # flops below which a dense SVD of X is cheaper than randomized iterations


def _leading_left_vectors(X: torch.Tensor, k: int, generator: torch.Generator, power_iters: int = 2) -> torch.Tensor:
    """Orthonormal [m, k] basis of the k leading left singular vectors of X [m, n] (randomized if large)."""
    m, n = X.shape
    if m * n * min(m, n) <= _EXACT_LIMIT:
        U, _, _ = torch.linalg.svd(X, full_matrices=False)
        out = U[:, :k]
    else:
        p = min(k + 10, min(m, n))
        omega = torch.randn(n, p, generator=generator, dtype=X.dtype)
        Y, _ = torch.linalg.qr(X @ omega)
        for _ in range(power_iters):
            Z, _ = torch.linalg.qr(X.T @ Y)
            Y, _ = torch.linalg.qr(X @ Z)
        small = Y.T @ X  # [p, n]
        Us, _, _ = torch.linalg.svd(small, full_matrices=False)
        out = Y @ Us[:, :k]
    if out.shape[1] < k:  # k exceeds the rank of the stack: pad with orthonormal complement
        out = _complete_basis(out, k, generator)
    return out


def _complete_basis(Q: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Extend orthonormal columns Q [m, j] to [m, k] with random orthonormal directions."""
    m, j = Q.shape
    extra = torch.randn(m, k - j, generator=generator, dtype=Q.dtype)
    extra = extra - Q @ (Q.T @ extra)
    full, _ = torch.linalg.qr(torch.cat([Q, extra], dim=1))
    # keep the sign/direction of the original columns
    signs = torch.sign((full[:, :j] * Q).sum(0))
    signs[signs == 0] = 1
    full[:, :j] = full[:, :j] * signs
    return full


def _stacked_side(M: torch.Tensor, other: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[sqrt(w_i) M_i.T R_i.T]_i with other_i.T = Q_i R_i: shape [d, N r]."""
    _, R = torch.linalg.qr(other.transpose(1, 2))  # other: [N, r, d'], R: [N, r, r]
    X = M.transpose(1, 2) @ R.transpose(1, 2)  # [N, d, r]
    X = X * weights.sqrt().view(-1, 1, 1)
    return X.permute(1, 0, 2).reshape(M.shape[2], -1)


def hosvd_init(stack: FactorStack, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (U [d_out, k], V [d_in, k]), orthonormal, from the stacked factors."""
    g = torch.Generator().manual_seed(seed)
    k_out, k_in = min(k, stack.d_out), min(k, stack.d_in)
    U = _leading_left_vectors(_stacked_side(stack.Bt, stack.A, stack.weights), k_out, g)
    V = _leading_left_vectors(_stacked_side(stack.A, stack.Bt, stack.weights), k_in, g)
    return U.contiguous(), V.contiguous()
