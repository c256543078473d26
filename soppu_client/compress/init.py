"""HOSVD-style initialisation of a shared basis from stacked factors.

The k leading left singular vectors of [sqrt(w_1) dW_1, ..., sqrt(w_N) dW_N] span the best
common column space. On factors: with A_i A_i.T = L_i L_i.T (r x r, from the stack's Grams),
dW_i dW_i.T = B_i L_i L_i.T B_i.T, so the same vectors are the left singular vectors of
X = [sqrt(w_i) B_i L_i]_i, a d_out x (N r) matrix that never forms a d_out x d_in product. The
right side is symmetric (with B_i.T B_i).

The vectors come from a randomized range finder (k + 8 probes, ``power_iters`` power steps): the
JD-Full iterations refine the subspace anyway, so a costly exact one does not pay.
"""

from __future__ import annotations

import torch

from soppu_client.compress.stack import FactorStack

_EXACT_LIMIT = 5e8  # flops below which a dense SVD of X is cheaper than randomized iterations
POWER_ITERS = 1


def _leading_left_vectors(Xt: torch.Tensor, k: int, generator: torch.Generator, power_iters: int) -> torch.Tensor:
    """Orthonormal [m, k] basis of the k leading left singular vectors of X = Xt.T, Xt [n, m]."""
    n, m = Xt.shape
    if m * n * min(m, n) <= _EXACT_LIMIT:
        _, _, vh = torch.linalg.svd(Xt, full_matrices=False)
        out = vh[:k].T
    else:
        p = min(k + 8, min(m, n))
        omega = torch.randn(n, p, generator=generator, dtype=Xt.dtype)
        Y, _ = torch.linalg.qr(Xt.T @ omega)
        for _ in range(power_iters):
            Z, _ = torch.linalg.qr(Xt @ Y)
            Y, _ = torch.linalg.qr(Xt.T @ Z)
        small = Xt @ Y  # [n, p]: X.T Y
        _, _, vh = torch.linalg.svd(small, full_matrices=False)
        out = Y @ vh[:k].T
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


def _stacked_side(M: torch.Tensor, gram_other: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """X.T = [sqrt(w_i) L_i.T M_i]_i with L_i L_i.T = gram_other_i: shape [N r, d]."""
    lam, Q = torch.linalg.eigh(gram_other.double())  # PSD; zero-padded ranks give zero eigenvalues
    L = (Q * lam.clamp_min(0).sqrt().unsqueeze(1)).to(M.dtype)  # [N, r, r], L L.T = gram
    Xt = (L.transpose(1, 2) @ M) * weights.sqrt().view(-1, 1, 1)  # [N, r, d]
    return Xt.reshape(-1, M.shape[2])


def hosvd_init(stack: FactorStack, k: int, seed: int = 0, power_iters: int = POWER_ITERS, *,
               right: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (U [d_out, k], V [d_in, k]), orthonormal, from the stacked factors.

    ``right=False``: V is random orthonormal instead (JD-Full's first half step replaces it with
    the best V for this U within span[V, G V], which costs less than V's own range finder).
    """
    g = torch.Generator().manual_seed(seed)
    gram_A, gram_B = stack.grams()
    k_out, k_in = min(k, stack.d_out), min(k, stack.d_in)
    U = _leading_left_vectors(_stacked_side(stack.Bt, gram_A, stack.weights), k_out, g, power_iters)
    if right:
        V = _leading_left_vectors(_stacked_side(stack.A, gram_B, stack.weights), k_in, g, power_iters)
    else:
        V = _complete_basis(stack.A.new_zeros(stack.d_in, 0), k_in, g)
    return U.contiguous(), V.contiguous()
