"""Projection of adapters onto a given shared basis (no refit of U, V).

    full (orthonormal U, V):  S_i = U.T B_i A_i V                  (best core in Frobenius norm)
    diag (any U, V):          [(U.T U) * (V.T V)] s_i = diag(U.T B_i A_i V)   (least squares)
"""

from __future__ import annotations

import torch

from soppu_client.compress.stack import FactorStack


def project_cores(stack: FactorStack, U: torch.Tensor, V: torch.Tensor, *, diag: bool) -> torch.Tensor:
    """Cores of every adapter in ``stack`` on the fixed basis (U, V): [N, k, k] or [N, k]."""
    C = stack.project_left(U)
    AV = stack.project_right(V)
    if not diag:
        return C.transpose(1, 2) @ AV
    M = ((U.T @ U) * (V.T @ V)).double()
    rhs = (C * AV).sum(1).double()
    return torch.linalg.solve(M, rhs.T).T.to(U.dtype)
