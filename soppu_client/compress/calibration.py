"""Data-aware fitting (K-FAC style): weight the fit by what each module sees on the owner's prompts.

Statistics, on the base model, from the calibration prompts of the adapters being compressed
(pooled per module; loss = next-token LM loss on the chat-templated prompt text):

    Sigma = E[x x^T]    x: the module's input            [d_in, d_in]
    Gamma = E[g g^T]    g = dLoss / d(module output)     [d_out, d_out]
    damped: M + damping * mean(diag M) * I

Weighted fit (``a`` = output power, ``b`` = input power):

    minimize  sum_i w_i ||Gamma^(a/2) (dW_i - U S_i V^T) Sigma^(b/2)||_F^2

by the plain fit on transformed factors B_i' = Gamma^(a/2) B_i, A_i' = A_i Sigma^(b/2) giving
(U', V', S_i); then U = Gamma^(-a/2) U', V = Sigma^(-b/2) V' and re-orthonormalization
U = Q_u R_u, V = Q_v R_v, S_i <- R_u S_i R_v^T (same U S_i V^T, orthonormal bases again). Only
r x d and k x d products are formed; nothing of size d_out x d_in.

Input: ``<adapter dir>/calibration.jsonl``, one JSON object a line with ``prompt`` (or ``text``).
Calibration prompts must not appear in that adapter's ``prompts.json`` (the evaluation prompts).
They are used locally and never written into the bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soppu_client.format.errors import InputError

CALIBRATION_FILE = "calibration.jsonl"
CALIBRATION_MODES = ("auto", "none")
MAX_TOKENS = 256  # per prompt


@dataclass
class ModuleStats:
    """Damped second moments of one module: Sigma [d_in, d_in], Gamma [d_out, d_out] (float64)."""

    sigma: np.ndarray
    gamma: np.ndarray
    tokens: int


def read_calibration(adapter_dir: str | Path, name: str | None = None) -> list[str] | None:
    """Prompts of ``<adapter_dir>/calibration.jsonl`` (None when absent), checked against prompts.json.

    Raises InputError naming the file and line for malformed lines, and naming the adapter and the
    count when calibration prompts appear among its evaluation prompts (``prompts.json``).
    """
    adapter_dir = Path(adapter_dir)
    name = name or adapter_dir.name
    path = adapter_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    prompts: list[str] = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{no} is not valid JSON ({exc}); expected {{\"prompt\": \"...\"}}") from None
        text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text:
            raise InputError(f"{path}:{no} needs a non-empty string `prompt` (or `text`)")
        prompts.append(text)
    if not prompts:
        raise InputError(f"{path} holds no prompts; remove it or add lines like {{\"prompt\": \"...\"}}")
    evaluation = adapter_dir / "prompts.json"
    if evaluation.is_file():
        try:
            items = json.loads(evaluation.read_text(encoding="utf-8"))
        except ValueError:
            items = []
        held = {it if isinstance(it, str) else it.get("prompt") for it in items if isinstance(it, (str, dict))}
        overlap = [p for p in prompts if p in held]
        if overlap:
            raise InputError(
                f"adapter `{name}`: {len(overlap)} calibration prompt(s) in {path} also appear in {evaluation} "
                f"(e.g. {overlap[0]!r}); calibration must use training inputs only, remove them"
            )
    return prompts


def _sqrt_pair(m: np.ndarray, power: float) -> tuple[np.ndarray, np.ndarray]:
    """(M^(p/2), M^(-p/2)) of a symmetric positive definite M, by eigendecomposition."""
    evals, evecs = np.linalg.eigh(m)
    evals = np.clip(evals, evals.max() * 1e-12, None)
    half = evals ** (power / 2)
    return (evecs * half) @ evecs.T, (evecs / half) @ evecs.T


def damp(m: np.ndarray, damping: float) -> np.ndarray:
    """M + damping * mean(diag M) * I."""
    return m + damping * float(np.mean(np.diag(m))) * np.eye(m.shape[0])


def transform(
    factors: list[tuple[np.ndarray, np.ndarray]], stats: ModuleStats, output_power: float, input_power: float
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """(A_i Sigma^(b/2), Gamma^(a/2) B_i) for every adapter, and the inverse maps Gamma^(-a/2), Sigma^(-b/2)."""
    g_half, g_inv = _sqrt_pair(stats.gamma, output_power)
    s_half, s_inv = _sqrt_pair(stats.sigma, input_power)
    dtype = factors[0][0].dtype
    return [((a @ s_half).astype(dtype), (g_half @ b).astype(dtype)) for a, b in factors], g_inv, s_inv


def map_back(
    U_: np.ndarray, V_: np.ndarray, S: np.ndarray, g_inv: np.ndarray, s_inv: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U = orth(Gamma^(-a/2) U'), V = orth(Sigma^(-b/2) V'), S_i <- R_u S_i R_v^T (U S_i V^T unchanged)."""
    Qu, Ru = np.linalg.qr(g_inv @ np.asarray(U_, dtype=np.float64))
    Qv, Rv = np.linalg.qr(s_inv @ np.asarray(V_, dtype=np.float64))
    return Qu, Qv, Ru[None] @ np.asarray(S, dtype=np.float64) @ Rv.T[None]


def weighted_module_fit(factors, stats: ModuleStats, config, cluster_of: list[int] | None = None):
    """:func:`soppu_client.compress.fit_module` under the weighted objective (full cores only).

    ``config.calibration_output_power`` = a, ``config.calibration_input_power`` = b. Returns a
    ModuleFit with orthonormal bases per cluster, in the fit's dtype.
    """
    from soppu_client.compress import fit_module

    if config.diag:
        raise InputError("calibration applies to --method full only; pass --calibration none with --method diag")
    moved, g_inv, s_inv = transform(factors, stats, config.calibration_output_power, config.calibration_input_power)
    fit = fit_module(moved, config, cluster_of)
    fit.stack = None  # it holds the weighted factors: the metrics must see the adapters' own
    dtype = fit.cores.dtype
    for c in range(len(fit.U)):
        members = [i for i, ci in enumerate(fit.cluster_of) if ci == c]
        U, V, S = map_back(fit.U[c].double().numpy(), fit.V[c].double().numpy(), fit.cores[members].double().numpy(),
                           g_inv, s_inv)
        fit.U[c], fit.V[c] = torch.from_numpy(U).to(dtype), torch.from_numpy(V).to(dtype)
        fit.cores[members] = torch.from_numpy(S).to(dtype)
    return fit


def _encode(tok, prompts: list[str]) -> list[list[int]]:
    rows = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        rows.append(list(ids)[:MAX_TOKENS])
    return rows


def collect_statistics(
    prompts: list[str],
    modules: list[str],
    base_model: str | None = None,
    *,
    damping: float = 0.01,
    batch_size: int = 16,
    progress: Callable | None = None,
) -> dict[str, ModuleStats]:
    """Sigma and Gamma (damped, float64) of every module in ``modules`` over ``prompts``.

    ``modules`` are PEFT target names such as ``model.layers.3.self_attn.q_proj`` (the base
    model's own ``named_modules`` names). The loss is the mean next-token loss over all prompt
    tokens of a batch; gradients are rescaled per batch so each token's g counts as in a per-token loss.
    """
    from soppu_client.base_model import load_base_model

    if not prompts:
        raise InputError("calibration needs at least one prompt")
    model, tok = load_base_model(base_model)
    named = dict(model.named_modules())
    missing = [m for m in modules if m not in named and f"model.{m}" not in named]
    if missing:
        raise InputError(
            f"calibration: the base model has no module `{missing[0]}`"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; pass the --base-model the adapters were trained on"
        )
    targets = {m: named[m] if m in named else named[f"model.{m}"] for m in modules}
    sig = {m: torch.zeros(t.in_features, t.in_features, dtype=torch.float64) for m, t in targets.items()}
    gam = {m: torch.zeros(t.out_features, t.out_features, dtype=torch.float64) for m, t in targets.items()}
    state: dict = {}
    handles = []

    def fwd(name):
        def hook(mod, inputs, output):
            x = inputs[0].detach()[state["mask"]].double()
            sig[name] += x.T @ x
        return hook

    def bwd(name):
        def hook(mod, grad_input, grad_output):
            g = grad_output[0].detach()[state["mask"]].double() * state["scale"]
            gam[name] += g.T @ g
        return hook

    for name, mod in targets.items():
        handles.append(mod.register_forward_hook(fwd(name)))
        handles.append(mod.register_full_backward_hook(bwd(name)))
    for p in model.parameters():
        p.requires_grad_(False)
    rows = _encode(tok, prompts)
    tokens = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    try:
        for batch in progress(batches) if progress else batches:
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for i, r in enumerate(batch):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = True
            labels = ids.masked_fill(~mask, -100)
            n_pred = int((labels[:, 1:] != -100).sum())
            state["mask"], state["scale"] = mask, float(max(n_pred, 1))  # undo the mean over tokens
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # grads flow to hooks
            out = model(inputs_embeds=emb, attention_mask=mask.long(), labels=labels)
            out.loss.backward()
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    preds = max(tokens - len(rows), 1)
    return {
        m: ModuleStats(
            sigma=damp((sig[m] / tokens).numpy(), damping), gamma=damp((gam[m] / preds).numpy(), damping), tokens=tokens
        )
        for m in modules
    }


def prepare(collection, config, base_model: str | None = None, *, stats: dict[str, ModuleStats] | None = None,
            progress: Callable | None = None, max_per_adapter: int | None = None,
            ) -> tuple[dict[str, ModuleStats] | None, dict | None]:
    """(statistics per module, manifest record) for a run, or (None, None) for a plain fit.

    ``config.calibration == "auto"``: pool the ``calibration.jsonl`` prompts of the adapters that
    have one (each checked against its ``prompts.json``); none present: plain fit. ``stats``, when
    given, are used instead of recomputing them (same prompts and base model; benchmarks). The
    record holds counts and exponents only, never the prompts. ``max_per_adapter``: use only the
    first that many prompts of each file (cost: one forward and backward pass per prompt).
    """
    if config.calibration == "none":
        return None, None
    per_adapter = {info.name: read_calibration(info.path, info.name) for info in collection.adapters}
    found = {n: p for n, p in per_adapter.items() if p}
    if not found:
        return None, None
    if config.diag:
        raise InputError(
            f"calibration applies to --method full only, and {len(found)} adapter(s) have {CALIBRATION_FILE}; "
            "pass --calibration none with --method diag"
        )
    pooled = [p for prompts in found.values() for p in prompts[:max_per_adapter]]
    if stats is None:
        stats = collect_statistics(pooled, collection.modules, base_model, damping=config.calibration_damping,
                                   progress=progress)
    record = {"adapters": len(found), "prompts": len(pooled), "tokens": next(iter(stats.values())).tokens,
              "output_power": config.calibration_output_power, "input_power": config.calibration_input_power,
              "damping": config.calibration_damping}
    return stats, record
