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


def module_metrics(
    module: str,
    factors: list[tuple[np.ndarray, np.ndarray]],
    U: list[np.ndarray],
    V: list[np.ndarray],
    cores: list[np.ndarray],
    cluster_of: list[int],
    k: int,
) -> ModuleMetrics:
    """Exact factored metrics of one module for every adapter, batched over adapters (float64).

    Same identities as :func:`factored_sq_norm`, :func:`residual_sq_norm` and :func:`svd_tail_sq`,
    evaluated with one batched product per term (ranks zero-padded to the largest, which changes
    no product); residuals below the Gram identity's trust level are recomputed one by one. The
    SVD tail comes from the r x r eigenproblem L.T (B.T B) L, A A.T = L L.T (accurate for tails
    above ~1e-12 of ||dW||^2, i.e. lower bounds above ~1e-6).
    """
    import torch

    n = len(factors)
    r = max(a.shape[0] for a, _ in factors)
    d_in, d_out = factors[0][0].shape[1], factors[0][1].shape[0]
    A = torch.zeros(n, r, d_in, dtype=torch.float64)
    B = torch.zeros(n, d_out, r, dtype=torch.float64)
    for i, (a, b) in enumerate(factors):
        A[i, : a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float64))
        B[i, :, : b.shape[1]] = torch.from_numpy(np.asarray(b, dtype=np.float64))
    Bt = B.transpose(1, 2)
    BtB, AAt = Bt @ B, A @ A.transpose(1, 2)  # [N, r, r]
    sq_norm = (BtB * AAt).sum((1, 2))
    sq_res = torch.empty(n, dtype=torch.float64)
    for c in sorted(set(cluster_of)):
        idx = torch.tensor([i for i, ci in enumerate(cluster_of) if ci == c])
        Uc = torch.from_numpy(np.asarray(U[c], dtype=np.float64))
        Vc = torch.from_numpy(np.asarray(V[c], dtype=np.float64))
        S = torch.stack([torch.from_numpy(np.asarray(cores[i], dtype=np.float64)) for i in idx.tolist()])
        if S.ndim == 2:
            S = torch.diag_embed(S)
        AV = A[idx] @ Vc  # [n_c, r, k]
        BtUS = (Bt[idx] @ Uc) @ S  # [n_c, r, k]
        quad = ((S.transpose(1, 2) @ (Uc.T @ Uc) @ S) * (Vc.T @ Vc)).sum((1, 2))
        sq_res[idx] = sq_norm[idx] - 2.0 * (BtUS * AV).sum((1, 2)) + quad
    sq_res = sq_res.numpy()
    sq_norm_np = sq_norm.numpy()
    for i in np.flatnonzero(sq_res <= _GRAM_TRUST * sq_norm_np):  # cancellation regime: exact QR path
        c = cluster_of[i]
        sq_res[i] = residual_sq_norm(*factors[i], U[c], cores[i], V[c])
    # sigma_j^2 of B A are the eigenvalues of L.T (B.T B) L with A A.T = L L.T (all r x r)
    lam, Q = torch.linalg.eigh(AAt)
    L = Q * lam.clamp_min(0).sqrt().unsqueeze(1)
    sigma_sq = torch.linalg.eigvalsh(L.transpose(1, 2) @ BtB @ L).flip(1).clamp_min(0)  # descending
    sq_low = sigma_sq[:, k:].sum(1)
    return ModuleMetrics(module, sq_norm_np.copy(), np.maximum(sq_res, 0.0), sq_low.numpy())


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

