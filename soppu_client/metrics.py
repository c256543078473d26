"""Reconstruction errors, computed exactly on factors (float64), never on dense dW.

Error of adapter i on a module, reported as the UNSQUARED relative Frobenius norm

    e_i = ||dW_i - U S_i V.T||_F / ||dW_i||_F,   dW_i = B_i A_i  (scaling folded into B_i)

With X = [B_i, -U S_i] and Y = [A_i; V.T], dW_i - U S_i V.T = X Y and
||X Y||_F^2 = sum((X.T X) * (Y Y.T)), whose blocks are all r x r, r x k or k x k.

Lower bound (no shared basis can beat it): adapter i's own rank-k truncated SVD,
e_i* = sqrt(sum_{j>k} sigma_j^2 / sum_j sigma_j^2), with sigma from the r x r core of
B_i = Q_b R_b, A_i.T = Q_a R_a: dW_i = Q_b (R_b R_a.T) Q_a.T.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


def factored_sq_norm(A: np.ndarray, B: np.ndarray) -> float:
    """||B @ A||_F^2 from A [r, d_in], B [d_out, r]."""
    A, B = A.astype(np.float64), B.astype(np.float64)
    return float(np.sum((B.T @ B) * (A @ A.T)))


_GRAM_TRUST = 1e-6  # below this squared relative residual the Gram identity loses digits to cancellation


def residual_sq_norm(A: np.ndarray, B: np.ndarray, U: np.ndarray, S: np.ndarray, V: np.ndarray) -> float:
    """||B A - U S V.T||_F^2 (S [k, k], or [k] for a diagonal core) without forming d_out x d_in.

    Uses the Gram identity (cheap); when the residual is tiny relative to ||B A||^2, where the
    identity cancels, it recomputes from thin QRs of X and Y.T: ||X Y||_F = ||R_x R_y.T||_F.
    """
    A, B, U, V = (x.astype(np.float64) for x in (A, B, U, V))
    S = np.diag(S.astype(np.float64)) if S.ndim == 1 else S.astype(np.float64)
    US = U @ S
    AV = A @ V
    norm = np.sum((B.T @ B) * (A @ A.T))
    total = norm - 2.0 * np.sum((B.T @ US) * AV) + np.sum((US.T @ US) * (V.T @ V))
    if total > _GRAM_TRUST * norm:
        return float(total)
    _, rx = np.linalg.qr(np.concatenate([B, -US], axis=1))
    _, ry = np.linalg.qr(np.concatenate([A.T, V], axis=1))
    return float(np.sum((rx @ ry.T) ** 2))


def singular_values(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Singular values of B @ A (descending, length r) from two thin QRs."""
    _, rb = np.linalg.qr(B.astype(np.float64))
    _, ra = np.linalg.qr(A.astype(np.float64).T)
    return np.linalg.svd(rb @ ra.T, compute_uv=False)


def svd_tail_sq(A: np.ndarray, B: np.ndarray, k: int) -> float:
    """||dW - best rank-k approximation||_F^2 = sum of squared singular values past k."""
    s = singular_values(A, B)
    return float(np.sum(s[k:] ** 2))


def relative(sq_err: np.ndarray, sq_norm: np.ndarray) -> np.ndarray:
    """Unsquared relative error sqrt(sq_err / sq_norm); 0 where the update itself is 0."""
    sq_err, sq_norm = np.asarray(sq_err, dtype=np.float64), np.asarray(sq_norm, dtype=np.float64)
    return np.sqrt(np.divide(sq_err, sq_norm, out=np.zeros_like(sq_err), where=sq_norm > 0))


@dataclass
class ModuleMetrics:
    """Squared norms per adapter for one module; errors derive from them."""

    module: str
    sq_norm: np.ndarray  # [N] ||dW_i||^2
    sq_residual: np.ndarray  # [N] ||dW_i - U S_i V.T||^2
    sq_lower: np.ndarray  # [N] rank-k SVD tail

    @property
    def error(self) -> np.ndarray:
        return relative(self.sq_residual, self.sq_norm)

    @property
    def lower_bound(self) -> np.ndarray:
        return relative(self.sq_lower, self.sq_norm)

    def to_json(self, names: list[str]) -> dict:
        return {
            "module": self.module,
            "error": dict(zip(names, map(float, self.error))),
            "lower_bound": dict(zip(names, map(float, self.lower_bound))),
        }


_GRAM_TRUST_F32 = 1e-2  # the same for products of a float32 stack (relative rounding ~1e-6 of ||dW||^2)


def module_metrics(
    module: str,
    factors: list[tuple[np.ndarray, np.ndarray]],
    U: list[np.ndarray],
    V: list[np.ndarray],
    cores: list[np.ndarray],
    cluster_of: list[int],
    k: int,
    *,
    stack=None,
) -> ModuleMetrics:
    """Exact factored metrics of one module for every adapter, batched over adapters.

    Same identities as :func:`factored_sq_norm`, :func:`residual_sq_norm` and :func:`svd_tail_sq`.
    The products over d (A_i V, B_i.T U, the Grams) are one GEMM per cluster on a
    :class:`~soppu_client.compress.stack.FactorStack` of ``factors``: ``stack`` when the fit
    passes its own (float32: no copy, ~10x faster than float64), else a float64 one built here.
    Everything r x r / k x k is float64. Adapters whose squared residual falls below the trust
    level of the products' precision (1e-2 of ||dW_i||^2 for float32, 1e-6 for float64, where the
    identity cancels) are recomputed in float64, and below 1e-6 from thin QRs. The SVD tail is 0
    where k >= r_i (rank(B_i A_i) <= r_i), else from the r x r eigenproblem L.T (B.T B) L,
    A A.T = L L.T in float64 (accurate for tails above ~1e-12 of ||dW||^2).
    """
    import torch

    from soppu_client.compress.stack import stack_factors

    if stack is None:
        stack = stack_factors(factors, "norm", torch.float64)
    f64 = torch.float64
    dt = stack.A.dtype
    n, r = stack.n, stack.r
    gram_A, gram_B = stack.grams()
    sq_norm = (gram_B.to(f64) * gram_A.to(f64)).sum((1, 2))
    sq_res = torch.empty(n, dtype=f64)
    one_cluster = len(set(cluster_of)) == 1
    for c in sorted(set(cluster_of)):
        idx = torch.tensor([i for i, ci in enumerate(cluster_of) if ci == c])
        Uc, Vc = torch.as_tensor(np.asarray(U[c])), torch.as_tensor(np.asarray(V[c]))
        A = stack.A if one_cluster else stack.A[idx]
        Bt = stack.Bt if one_cluster else stack.Bt[idx]
        AV = (A.reshape(-1, stack.d_in) @ Vc.to(dt)).view(len(idx), r, -1).to(f64)  # [n_c, r, k]
        BtU = (Bt.reshape(-1, stack.d_out) @ Uc.to(dt)).view(len(idx), r, -1).to(f64)
        S = torch.stack([torch.as_tensor(np.asarray(cores[i]), dtype=f64) for i in idx.tolist()])
        if S.ndim == 2:
            S = torch.diag_embed(S)
        Uc, Vc = Uc.to(f64), Vc.to(f64)
        quad = ((S.transpose(1, 2) @ (Uc.T @ Uc) @ S) * (Vc.T @ Vc)).sum((1, 2))
        sq_res[idx] = sq_norm[idx] - 2.0 * ((BtU @ S) * AV).sum((1, 2)) + quad
    sq_res_np, sq_norm_np = sq_res.numpy(), sq_norm.numpy()
    if dt != f64:  # below the float32 products' trust level: the same identities in float64
        redo = np.flatnonzero(sq_res_np <= _GRAM_TRUST_F32 * sq_norm_np)
        if redo.size:
            sub = module_metrics(module, [factors[i] for i in redo], U, V, [cores[i] for i in redo],
                                 [cluster_of[i] for i in redo], k)
            sq_res_np[redo], sq_norm_np[redo] = sub.sq_residual, sub.sq_norm
    else:
        for i in np.flatnonzero(sq_res_np <= _GRAM_TRUST * sq_norm_np):  # cancellation regime: exact QR path
            c = cluster_of[i]
            sq_res_np[i] = residual_sq_norm(*factors[i], U[c], cores[i], V[c])
    sq_low = np.zeros(n)
    short = [i for i, (a, _) in enumerate(factors) if a.shape[0] > k]  # rank may exceed k: a tail exists
    if short:
        # sigma_j^2 of B A are the eigenvalues of L.T (B.T B) L with A A.T = L L.T (all r x r, float64)
        sel = torch.tensor(short)
        if dt == f64:  # the stack's own Grams are already float64
            AAt, BtB = gram_A[sel], gram_B[sel]
        else:
            A64, Bt64 = stack.A[sel].to(f64), stack.Bt[sel].to(f64)
            AAt, BtB = A64 @ A64.transpose(1, 2), Bt64 @ Bt64.transpose(1, 2)
        lam, Q = torch.linalg.eigh(AAt)
        L = Q * lam.clamp_min(0).sqrt().unsqueeze(1)
        sigma_sq = torch.linalg.eigvalsh(L.transpose(1, 2) @ BtB @ L).flip(1).clamp_min(0)  # descending
        sq_low[short] = sigma_sq[:, k:].sum(1).numpy()
    return ModuleMetrics(module, sq_norm_np.copy(), np.maximum(sq_res_np, 0.0), sq_low)


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def module_layer(module: str) -> int | None:
    m = _LAYER_RE.search(module)
    return int(m.group(1)) if m else None


def module_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def summarize(metrics: list[ModuleMetrics], names: list[str]) -> dict:
    """Per-adapter and per-(layer, module type) summaries of the unsquared relative error.

    Per adapter, ``error`` is over the whole adapter: sqrt(sum_m ||R_im||^2 / sum_m ||dW_im||^2);
    ``mean_module_error`` / ``max_module_error`` are over its modules.
    """
    sq_norm = np.stack([m.sq_norm for m in metrics])  # [M, N]
    sq_res = np.stack([m.sq_residual for m in metrics])
    sq_low = np.stack([m.sq_lower for m in metrics])
    err = relative(sq_res, sq_norm)
    low = relative(sq_low, sq_norm)
    per_adapter = {}
    for j, name in enumerate(names):
        per_adapter[name] = {
            "error": float(relative(sq_res[:, j].sum(), sq_norm[:, j].sum())),
            "lower_bound": float(relative(sq_low[:, j].sum(), sq_norm[:, j].sum())),
            "mean_module_error": float(err[:, j].mean()),
            "max_module_error": float(err[:, j].max()),
        }
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(metrics):
        groups.setdefault((module_layer(m.module), module_type(m.module)), []).append(i)
    per_layer = [
        {
            "layer": layer,
            "module_type": mtype,
            "mean_error": float(err[idx].mean()),
            "max_error": float(err[idx].max()),
            "mean_lower_bound": float(low[idx].mean()),
        }
        for (layer, mtype), idx in sorted(groups.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0, kv[0][1]))
    ]
    return {
        "error_definition": "unsquared relative Frobenius norm ||dW - U S V^T||_F / ||dW||_F",
        "mean_error": float(np.mean([v["error"] for v in per_adapter.values()])),
        "max_error": float(np.max([v["error"] for v in per_adapter.values()])),
        "mean_lower_bound": float(np.mean([v["lower_bound"] for v in per_adapter.values()])),
        "adapters": per_adapter,
        "layers": per_layer,
    }

