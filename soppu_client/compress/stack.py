"""Stacked LoRA factors of one module, the operand of every fit.

The factors of N adapters, ranks padded to r_max with zeros (which leaves every dW_i unchanged),
are kept as two flat matrices so that each heavy product is one BLAS GEMM over all adapters:

    A_flat  [N * r_max, d_in]    rows i*r_max:(i+1)*r_max hold A_i
    Bt_flat [N * r_max, d_out]   rows i*r_max:(i+1)*r_max hold (s_i B_i).T

Also kept: the r x r Grams A_i A_i.T and B_i.T B_i (in the stack's dtype), from which
||dW_i||_F^2 = sum((B_i.T B_i) * (A_i A_i.T)) (summed in float64) and the initialisation follow.

Weights w_i put adapters on a common footing: ``equal`` uses w_i = 1 / ||dW_i||_F^2 so that every
adapter's *relative* error counts the same; ``norm`` uses w_i = 1 so larger updates dominate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from soppu_client.format.errors import InputError

WEIGHTINGS = ("equal", "norm")


@dataclass
class FactorStack:
    A: torch.Tensor  # [N, r, d_in]
    Bt: torch.Tensor  # [N, r, d_out]
    weights: torch.Tensor  # [N]
    sq_norms: torch.Tensor  # [N], ||dW_i||_F^2 (float64)
    gram_A: torch.Tensor | None = None  # [N, r, r] A_i A_i.T (computed on demand when None)
    gram_B: torch.Tensor | None = None  # [N, r, r] B_i.T B_i

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def r(self) -> int:
        return self.A.shape[1]

    @property
    def d_in(self) -> int:
        return self.A.shape[2]

    @property
    def d_out(self) -> int:
        return self.Bt.shape[2]

    @property
    def A_flat(self) -> torch.Tensor:
        return self.A.reshape(-1, self.d_in)

    @property
    def Bt_flat(self) -> torch.Tensor:
        return self.Bt.reshape(-1, self.d_out)

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_i A_i.T, B_i.T B_i), each [N, r, r]."""
        if self.gram_A is None or self.gram_A.dtype != self.A.dtype:
            self.gram_A = self.A @ self.A.transpose(1, 2)
        if self.gram_B is None or self.gram_B.dtype != self.Bt.dtype:
            self.gram_B = self.Bt @ self.Bt.transpose(1, 2)
        return self.gram_A, self.gram_B

    def project_right(self, V: torch.Tensor) -> torch.Tensor:
        """A_i @ V for every adapter: [N, r, k] (one GEMM)."""
        return (self.A_flat @ V).reshape(self.n, self.r, -1)

    def project_left(self, U: torch.Tensor) -> torch.Tensor:
        """B_i.T @ U for every adapter: [N, r, k] (one GEMM)."""
        return (self.Bt_flat @ U).reshape(self.n, self.r, -1)

    def subset(self, index: list[int]) -> "FactorStack":
        idx = torch.as_tensor(index, dtype=torch.long)
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return FactorStack(self.A[idx], self.Bt[idx], self.weights[idx], self.sq_norms[idx],
                           pick(self.gram_A), pick(self.gram_B))


def stack_factors(
    factors: list[tuple[np.ndarray, np.ndarray]], weighting: str = "equal", dtype=torch.float32
) -> FactorStack:
    """Stack ``[(A_i [r_i, d_in], B_i [d_out, r_i])]`` (scaling already folded into B_i)."""
    if weighting not in WEIGHTINGS:
        raise InputError(f"`weighting` should be one of {', '.join(WEIGHTINGS)}, but the value passed is {weighting!r}")
    n = len(factors)
    r = max(a.shape[0] for a, _ in factors)
    d_in = factors[0][0].shape[1]
    d_out = factors[0][1].shape[0]
    A = torch.zeros(n, r, d_in, dtype=dtype)
    Bt = torch.zeros(n, r, d_out, dtype=dtype)
    for i, (a, b) in enumerate(factors):
        A[i, : a.shape[0]] = torch.from_numpy(np.asarray(a))
        Bt[i, : b.shape[1]] = torch.from_numpy(np.asarray(b)).T
    stack = FactorStack(A=A, Bt=Bt, weights=torch.ones(n, dtype=dtype), sq_norms=torch.zeros(n, dtype=torch.float64))
    gram_A, gram_B = stack.grams()
    # ||B A||_F^2 = sum((B^T B) * (A A^T)), exact on factors (Grams in the stack's dtype, sum in float64).
    sq = (gram_B.double() * gram_A.double()).sum(dim=(1, 2))
    if weighting == "equal":
        w = torch.where(sq > 0, 1.0 / sq.clamp_min(1e-300), torch.zeros_like(sq))
        w = w / w.sum().clamp_min(1e-300) * n
    else:
        w = torch.ones(n, dtype=torch.float64)
    stack.weights, stack.sq_norms = w.to(dtype), sq
    return stack
