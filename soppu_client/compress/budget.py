"""Spread rank k and bits across modules under one byte budget (``soppu compress --budget``).

Budgets count file bytes: everything ``soppu compress`` writes (tensors, their safetensors
headers, metrics.json and manifest.json; not signature.json, which ``soppu sign`` adds later).
Each module m offers choices (k, basis bits, core bits), each with the bytes it adds (its tensor
data and its basis header entries, offsets counted at their largest width) and the weighted error
it is expected to leave (``module_choices``):

    err_m(k, b_B, b_C) = res_m(k) + (rho_B(b_B) + rho_C(b_C)) * cap_m(k)

res_m(k) / cap_m(k): weighted residual / captured energy of the module's fit truncated to its k
leading directions (the fit's bases are rotated so that the leading k carry the most energy:
eigenvectors of sum_i w_i S_i S_i.T and sum_i w_i S_i.T S_i); rho: the relative error that
quantizing the bases (resp. the cores) to b bits added at the largest k, measured on the module.

:func:`allocate` minimizes sum_m err_m subject to sum_m bytes_m <= budget (a multiple-choice
knapsack): greedy on the lower convex hull of each module's (bytes, error) choices, taking the
steepest error drop per byte that still fits, then spending what is left on the best single
upgrades. At every budget where the greedy path stops exactly, this is optimal (the LP relaxation
is integral there); elsewhere it is within one hull step of optimal. What no module's choice
changes is set aside first (:func:`fixed_bytes`: the files' header frames, the packed core files'
at most three entries each, and an upper bound of the two JSON files the caller renders with every
number at its widest). After the choice the safetensors bytes are recomputed exactly
(``file_bytes.safetensors_file_bytes``) and recorded as ``fit.storage.planned_safetensors_bytes``.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

from soppu_client.format.errors import InputError

__all__ = ["Choice", "allocate", "basis_entry_bytes", "fixed_bytes", "parse_budget", "planned_safetensors_bytes"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_BUDGET_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_budget(text: str, source_bf16_bytes: int) -> int:
    """Bytes allowed: ``9x`` = source bytes at bf16 / 9; ``2MB``, ``500KB``, ``1.5GiB``, ``123456`` absolute."""
    m = _BUDGET_RE.match(str(text))
    unit = m.group(2).upper() if m else ""
    if not m or (unit not in _UNITS and unit != "X"):
        raise InputError(f"`--budget` {text!r} is neither a ratio like 9x nor a size like 2MB / 500KB / 1.5GiB")
    value = float(m.group(1))
    if value <= 0:
        raise InputError(f"`--budget` {text!r} must be positive")
    if unit == "X":
        return int(source_bf16_bytes / value)
    return int(value * _UNITS[unit])


@dataclass(frozen=True)
class Choice:
    """One way to store a module: rank ``k``, bits of bases / cores (None: float), bytes, error."""

    k: int
    basis_bits: int | None
    core_bits: int | None
    bytes: int
    error: float


def _hull(choices: list[Choice]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), cheapest first, error strictly falling."""
    order = sorted(range(len(choices)), key=lambda i: (choices[i].bytes, choices[i].error))
    front: list[int] = []
    for i in order:  # Pareto front: each point cheaper-or-equal and strictly better than the last
        if not front or choices[i].error < choices[front[-1]].error:
            if front and choices[i].bytes == choices[front[-1]].bytes:
                front.pop()
            front.append(i)
    hull: list[int] = []
    for i in front:
        while len(hull) >= 2:
            a, b = choices[hull[-2]], choices[hull[-1]]
            c = choices[i]
            # b is above the segment a-c: drop it
            if (b.error - a.error) * (c.bytes - a.bytes) >= (c.error - a.error) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(options: list[list[Choice]], budget: int, labels: list[str] | None = None) -> list[int]:
    """Index of the chosen Choice per module: least total error with total bytes <= ``budget``.

    Raises InputError when even the cheapest choice of every module does not fit.
    """
    hulls = [_hull(c) for c in options]
    pick = [h[0] for h in hulls]
    pos = [0] * len(options)
    used = sum(options[m][pick[m]].bytes for m in range(len(options)))
    if used > budget:
        raise InputError(f"`--budget` of {budget:,} bytes is below the smallest possible bundle ({used:,} bytes: "
                         "k=1 and the fewest bits everywhere); allow more bytes")

    def push(heap: list, m: int) -> None:
        if pos[m] + 1 < len(hulls[m]):
            a, b = options[m][hulls[m][pos[m]]], options[m][hulls[m][pos[m] + 1]]
            heapq.heappush(heap, (-(a.error - b.error) / max(b.bytes - a.bytes, 1), m))

    heap: list = []
    for m in range(len(options)):
        push(heap, m)
    while heap:
        _, m = heapq.heappop(heap)
        nxt = options[m][hulls[m][pos[m] + 1]]
        extra = nxt.bytes - options[m][pick[m]].bytes
        if used + extra > budget:
            continue  # this module's later hull steps are flatter still: stop upgrading it
        used += extra
        pos[m] += 1
        pick[m] = hulls[m][pos[m]]
        push(heap, m)
    while True:  # spend the rest on the best single upgrade (any choice, not only hull points)
        best = None
        for m, choices in enumerate(options):
            cur = choices[pick[m]]
            for i, c in enumerate(choices):
                if c.error < cur.error and used - cur.bytes + c.bytes <= budget:
                    gain = cur.error - c.error
                    if best is None or gain > best[0]:
                        best = (gain, m, i)
        if best is None:
            return pick
        _, m, i = best
        used += options[m][i].bytes - options[m][pick[m]].bytes
        pick[m] = i


# --------------------------------------------------------------------------- per-module choices


def order_fit(fit, stack):
    """The same fit with each cluster's bases rotated (full) or permuted (diag) so that the
    leading k directions carry the most weighted energy; dW_i ~ U S_i V.T is unchanged."""
    import torch

    from soppu_client.compress.result import ModuleFit

    f64 = torch.float64
    w = stack.weights.to(f64)
    U, V, cores = [], [], fit.cores.to(f64).clone()
    for c in range(len(fit.U)):
        idx = [i for i, ci in enumerate(fit.cluster_of) if ci == c]
        S, wi = cores[idx], w[idx]
        if fit.diag:
            perm = torch.argsort((wi[:, None] * S**2).sum(0), descending=True)
            U.append(fit.U[c].to(f64)[:, perm])
            V.append(fit.V[c].to(f64)[:, perm])
            cores[idx] = S[:, perm]
            continue
        # the cores as exact projections U.T dW_i V of this fit's bases (what cap(k) assumes)
        Uc, Vc = fit.U[c].to(f64), fit.V[c].to(f64)
        S = (stack.Bt[idx].to(f64) @ Uc).transpose(1, 2) @ (stack.A[idx].to(f64) @ Vc)
        wv = wi.view(-1, 1, 1)
        qu = torch.linalg.eigh((wv * S @ S.transpose(1, 2)).sum(0))[1].flip(1)
        qv = torch.linalg.eigh((wv * S.transpose(1, 2) @ S).sum(0))[1].flip(1)
        U.append(fit.U[c].to(f64) @ qu)
        V.append(fit.V[c].to(f64) @ qv)
        cores[idx] = qu.T @ S @ qv
    return ModuleFit(U=U, V=V, cores=cores, cluster_of=fit.cluster_of, diag=fit.diag, iterations=fit.iterations,
                     converged=fit.converged, history=fit.history)


def truncate_fit(fit, k: int):
    """The fit restricted to its first k directions (cores of orthonormal bases stay projections)."""
    from soppu_client.compress.result import ModuleFit

    cores = fit.cores[:, :k] if fit.diag else fit.cores[:, :k, :k]
    return ModuleFit(U=[u[:, :k].contiguous() for u in fit.U], V=[v[:, :k].contiguous() for v in fit.V],
                     cores=cores.contiguous(), cluster_of=fit.cluster_of, diag=fit.diag, iterations=fit.iterations,
                     converged=fit.converged, history=fit.history)


def captured(fit, stack) -> list[float]:
    """cap(k) = sum_i w_i ||S_i[:k, :k]||^2 for k = 0..k_max (an ordered fit with orthonormal bases)."""
    import torch

    w = stack.weights.to(torch.float64)
    S = fit.cores.to(torch.float64)
    k_max = S.shape[1]
    out = [0.0]
    for k in range(1, k_max + 1):
        part = S[:, :k] if fit.diag else S[:, :k, :k]
        out.append(float((w * (part**2).reshape(len(w), -1).sum(1)).sum()))
    return out


# --------------------------------------------------------------------------- bytes of files


def _widest(n: int) -> int:
    """The largest number with as many digits as ``n`` (offsets and sizes counted at their widest)."""
    return 10 ** len(str(max(n, 1))) - 1


def basis_entry_bytes(module: str, d_out: int, d_in: int, k: int, bits: int | None, group_size: int,
                      n_clusters: int, float_dtype: str, max_offset: int) -> int:
    """Header bytes module ``module``'s bases take in basis.safetensors at (k, bits), each offset
    counted at the width of ``max_offset`` (an upper bound of the file's data bytes)."""
    from soppu_client.format.bundle import stored_entries
    from soppu_client.format.file_bytes import entry_bytes
    from soppu_client.format.names import basis_key
    from soppu_client.format.quant import QuantSpec

    wide = _widest(max_offset)
    spec = None if bits is None else QuantSpec(bits, group_size)
    total = 0
    for c in range(n_clusters):
        for side, rows in (("U", d_out), ("V", d_in)):
            for name, (dt, shape) in stored_entries(basis_key(module, side, c, n_clusters), (rows, k), spec,
                                                    "basis", float_dtype).items():
                total += entry_bytes(name, dt, shape, wide, wide)
    return total


def fixed_bytes(names: list[str], float_dtype: str, max_core_bytes: int) -> int:
    """Upper bound of the safetensors bytes no module's choice changes: each file's length field,
    metadata, braces and padding, and each packed core file's (at most three) entries."""
    from soppu_client.format.file_bytes import entry_bytes, header_bytes
    from soppu_client.format.names import BUNDLE_FORMAT
    from soppu_client.format.packed_cores import CODES_KEY, FLOAT_KEY, SCALES_KEY
    from soppu_client.format.quant import SCALE_DTYPE

    frame = header_bytes({}, {"format": BUNDLE_FORMAT}) + 7  # + the most padding a header can need
    wide = _widest(max_core_bytes)
    core = sum(entry_bytes(key, dt, (wide,), wide, wide)
               for key, dt in ((FLOAT_KEY, float_dtype), (CODES_KEY, "U8"), (SCALES_KEY, SCALE_DTYPE)))
    return frame * (1 + len(names)) + core * len(names)


def planned_safetensors_bytes(modules: dict[str, tuple[int, int, int, int | None, int | None]], names: list[str],
                              diag: bool, n_clusters: int, group_size: int, float_dtype: str) -> int:
    """Exact bytes of basis.safetensors and the packed core files of a plan: ``modules`` module ->
    (d_out, d_in, k, basis bits, core bits)."""
    from soppu_client.format.bundle import stored_entries
    from soppu_client.format.file_bytes import safetensors_file_bytes
    from soppu_client.format.names import BUNDLE_FORMAT, basis_key
    from soppu_client.format.packed_cores import core_segments, packed_entries
    from soppu_client.format.quant import QuantSpec

    def spec(b: int | None) -> QuantSpec | None:
        return None if b is None else QuantSpec(b, group_size)

    meta = {"format": BUNDLE_FORMAT}
    basis: dict = {}
    for module, (d_out, d_in, k, bb, _bc) in modules.items():
        for c in range(n_clusters):
            for side, rows in (("U", d_out), ("V", d_in)):
                basis.update(stored_entries(basis_key(module, side, c, n_clusters), (rows, k), spec(bb), "basis",
                                            float_dtype))
    segments = core_segments({m: (k,) if diag else (k, k) for m, (_o, _i, k, _b, _c) in modules.items()},
                             {m: spec(bc) for m, (*_x, bc) in modules.items()})
    return (safetensors_file_bytes(basis, meta)
            + len(names) * safetensors_file_bytes(packed_entries(segments, float_dtype), meta))


# --------------------------------------------------------------------------- per-module choices (cont.)


def module_choices(stack, fit, bits: list[int | None], group_size: int, float_bytes: int, *,
                   rounding: str = "gptq", header=None) -> list[Choice]:
    """Every (k, basis bits, core bits) of one module with its bytes and normalized expected error
    (weighted squared error / sum_i w_i ||dW_i||^2, so every module counts the same).
    ``fit``: ordered (:func:`order_fit`), at the largest k; ``bits``: options, None = float;
    ``header(k, basis_bits)``: the header bytes the module's bases add (default: none)."""
    import torch

    from soppu_client.compress.quantize import quantize_module, weighted_sq_residual
    from soppu_client.format.quant import QuantSpec

    total = float((stack.weights.to(torch.float64) * stack.sq_norms.to(torch.float64)).sum()) or 1.0
    cap = captured(fit, stack)
    k_max, n, n_clusters = len(cap) - 1, stack.n, len(fit.U)
    d_out, d_in = fit.U[0].shape[0], fit.V[0].shape[0]
    res_max = max(total - cap[k_max], 0.0)

    def rho(b: int | None, role: str) -> float:
        if b is None or cap[k_max] <= 0:
            return 0.0
        spec = QuantSpec(b, group_size)
        q = quantize_module(stack, fit, spec if role == "basis" else None, spec if role == "cores" else None,
                            rounding=rounding)
        err = float(weighted_sq_residual(stack, q.U_values, q.V_values, q.core_values, fit.cluster_of).sum())
        return max(err - res_max, 0.0) / cap[k_max]

    rho_b = {b: rho(b, "basis") for b in bits}
    rho_c = {b: rho(b, "cores") for b in bits}

    def nbytes(rows: int, cols: int, b: int | None) -> int:
        return rows * cols * float_bytes if b is None else QuantSpec(b, group_size).stored_bytes(rows, cols)

    out = []
    for k in range(1, k_max + 1):
        core_n = k if fit.diag else k * k
        for bb in bits:
            basis_bytes = n_clusters * (nbytes(d_out, k, bb) + nbytes(d_in, k, bb)) + (header(k, bb) if header else 0)
            for bc in bits:
                err = max(total - cap[k], 0.0) + (rho_b[bb] + rho_c[bc]) * cap[k]
                out.append(Choice(k, bb, bc, basis_bytes + n * nbytes(core_n, 1, bc), err / total))
    return out


def stored_modules(collection, config, fitted, storage, plan: dict, *, json_bytes: int = 0, n_clusters: int = 1):
    """Quantize each fitted module (``--bits``) or, with ``--budget``, first fit every module at the
    largest k, then allocate k and bits (:func:`allocate`) and yield the truncated, quantized fits.

    ``fitted``: ``iter_compressed_modules``'s stream; yields the same ``(module, factors, fit)`` with
    ``fit.stored`` set. ``plan`` is filled with what was chosen (reported in the manifest's ``fit``).
    ``json_bytes``: an upper bound of manifest.json + metrics.json, set aside from the budget.
    """
    import numpy as np
    import torch

    from soppu_client.compress.quantize import quantize_module
    from soppu_client.compress.stack import stack_factors
    from soppu_client.format.quant import QuantSpec

    G = config.group_size

    def spec(b: int | None) -> QuantSpec | None:
        return None if b is None else QuantSpec(b, G)

    def stack_of(factors):
        return stack_factors(factors, config.weighting, torch.float64)

    if config.budget is None:
        for module, factors, fit in fitted:
            fit.stored = quantize_module(stack_of(factors), fit, spec(config.bits), spec(config.bits),
                                         rounding=config.rounding)
            plan.setdefault("modules", {})[module] = {"k": int(fit.U[0].shape[1]), "basis_bits": config.bits,
                                                      "core_bits": config.bits}
            yield module, factors, fit
        return
    from soppu_client.format.bundle import STORAGE_DTYPES

    float_bytes = torch.tensor([], dtype=storage).element_size()
    float_dtype = STORAGE_DTYPES[str(storage).removeprefix("torch.")]
    bits = [config.bits] if config.bits else [2, 3, 4, 8, None]
    names, k_max = collection.names, config.rank
    # the largest the data of basis.safetensors / a core file can be: every module at k_max, float
    max_basis = sum(n_clusters * k_max * (d_o + d_i) * float_bytes for d_o, d_i in collection.shapes.values())
    max_core = sum((k_max if config.diag else k_max * k_max) * float_bytes for _ in collection.shapes)
    ordered, options, dims = {}, [], {}
    for module, factors, fit in fitted:
        stack = stack_of(factors)
        ordered[module] = order_fit(fit, stack)
        d_out, d_in = ordered[module].U[0].shape[0], ordered[module].V[0].shape[0]
        dims[module] = (d_out, d_in)

        def header(k: int, bb: int | None, module=module, d_out=d_out, d_in=d_in) -> int:
            return basis_entry_bytes(module, d_out, d_in, k, bb, G, n_clusters, float_dtype, max_basis)

        options.append(module_choices(stack, ordered[module], bits, G, float_bytes, rounding=config.rounding,
                                      header=header))
    params_before = sum(info.modules[m][2] * (d_out + d_in) for info in collection.adapters
                        for m, (d_out, d_in) in collection.shapes.items())
    budget = parse_budget(config.budget, 2 * params_before)
    fixed = fixed_bytes(names, float_dtype, max_core) + json_bytes
    if fixed >= budget:
        raise InputError(f"`--budget` of {budget:,} bytes does not even hold the bundle's fixed files "
                         f"({fixed:,} bytes: manifest.json, metrics.json and the safetensors headers); "
                         "allow more bytes")
    picks = allocate(options, budget - fixed)
    chosen = [opts[i] for opts, i in zip(options, picks)]
    exact = planned_safetensors_bytes({m: (*dims[m], c.k, c.basis_bits, c.core_bits) for m, c in zip(ordered, chosen)},
                                      names, config.diag, n_clusters, G, float_dtype)
    tensor = sum(c.bytes - (basis_entry_bytes(m, *dims[m], c.k, c.basis_bits, G, n_clusters, float_dtype, max_basis))
                 for m, c in zip(ordered, chosen))
    plan.update(budget=config.budget, budget_bytes=budget, planned_bytes=tensor, planned_safetensors_bytes=exact,
                json_bytes_bound=json_bytes, planned_file_bytes=exact + json_bytes,
                source_bf16_bytes=2 * params_before, modules={})
    for (module, fit), choice in zip(ordered.items(), chosen):
        factors = collection.module_factors(module, dtype=np.float64)
        fit = truncate_fit(fit, choice.k)
        fit.stored = quantize_module(stack_of(factors), fit, spec(choice.basis_bits), spec(choice.core_bits),
                                     rounding=config.rounding)
        plan["modules"][module] = {"k": choice.k, "basis_bits": choice.basis_bits, "core_bits": choice.core_bits}
        yield module, factors, fit
