"""The byte-budget allocator (compress/budget.py) against brute force, and its inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from soppu_client.compress import CompressConfig, fit_module
from soppu_client.compress.budget import Choice, _hull, allocate, captured, order_fit, parse_budget, truncate_fit
from soppu_client.compress.stack import stack_factors
from soppu_client.format.errors import InputError


def _random_options(rng, n_modules: int, n_choices: int) -> list[list[Choice]]:
    out = []
    for _ in range(n_modules):
        nbytes = rng.integers(1, 60, size=n_choices)
        err = rng.uniform(0, 1, size=n_choices)
        out.append([Choice(k=i + 1, basis_bits=None, core_bits=None, bytes=int(b), error=float(e))
                    for i, (b, e) in enumerate(zip(nbytes, err))])
    return out


def _brute(options: list[list[Choice]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*options):
        if sum(c.bytes for c in combo) <= budget:
            best = min(best, sum(c.error for c in combo))
    return best


def _total(options, picks) -> tuple[int, float]:
    chosen = [o[i] for o, i in zip(options, picks)]
    return sum(c.bytes for c in chosen), sum(c.error for c in chosen)


@pytest.mark.parametrize("seed", range(12))
def test_allocator_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    options = _random_options(rng, n_modules=3, n_choices=5)
    lo = sum(min(c.bytes for c in o) for o in options)
    hi = sum(max(c.bytes for c in o) for o in options)
    checked_exact = 0
    for budget in range(lo, hi + 1, 3):
        picks = allocate(options, budget)
        used, err = _total(options, picks)
        opt = _brute(options, budget)
        assert used <= budget
        assert err >= opt - 1e-12  # brute force is the optimum
        # within one hull step of optimal (the LP-relaxation bound of the greedy)
        step = max(options[m][h[j]].error - options[m][h[j + 1]].error
                   for m, h in enumerate(map(_hull, options)) for j in range(len(h) - 1)) if any(
            len(_hull(o)) > 1 for o in options) else 0.0
        assert err <= opt + step + 1e-12
        if used == budget:  # stopped exactly on the greedy path: the LP optimum is integral
            assert err == pytest.approx(opt, abs=1e-12)
            checked_exact += 1
    # exact optimality at every breakpoint of the greedy path
    for m_budget in sorted({_total(options, allocate(options, b))[0] for b in range(lo, hi + 1)}):
        assert _total(options, allocate(options, m_budget))[1] == pytest.approx(_brute(options, m_budget), abs=1e-12)


def test_budget_below_the_smallest_bundle_is_refused() -> None:
    options = [[Choice(1, None, None, 10, 1.0)], [Choice(1, None, None, 7, 1.0)]]
    with pytest.raises(InputError, match=r"`--budget` of 16 bytes is below the smallest possible bundle \(17 bytes"):
        allocate(options, 16)


def test_parse_budget() -> None:
    assert parse_budget("9x", 900) == 100
    assert parse_budget("2MB", 0) == 2_000_000
    assert parse_budget("500KB", 0) == 500_000
    assert parse_budget("1.5KiB", 0) == 1536
    assert parse_budget("123", 0) == 123
    with pytest.raises(InputError, match="`--budget` 'lots' is neither a ratio like 9x nor a size like 2MB"):
        parse_budget("lots", 1)


def test_ordered_fit_is_the_same_fit_and_captured_matches_dense() -> None:
    rng = np.random.default_rng(1)
    factors = [(rng.standard_normal((4, 30)).astype(np.float32), rng.standard_normal((25, 4)).astype(np.float32))
               for _ in range(5)]
    fit = fit_module(factors, CompressConfig(rank=6))
    stack = stack_factors(factors, "equal", torch.float64)
    ordered = order_fit(fit, stack)
    w = stack.weights.numpy()
    for i, (A, B) in enumerate(factors):  # same reconstruction, rotated bases
        before = fit.U[0].double().numpy() @ fit.cores[i].double().numpy() @ fit.V[0].double().numpy().T
        after = ordered.U[0].numpy() @ ordered.cores[i].numpy() @ ordered.V[0].numpy().T
        np.testing.assert_allclose(after, before, atol=1e-5)
    cap = captured(ordered, stack)
    assert all(a <= b + 1e-9 for a, b in zip(cap, cap[1:]))
    for k in (1, 3, 6):  # captured(k) = weighted energy of the dense rank-k truncation's projection
        t = truncate_fit(ordered, k)
        U, V = t.U[0].numpy(), t.V[0].numpy()
        dense = sum(w[i] * np.linalg.norm(U.T @ (B.astype(np.float64) @ A) @ V) ** 2 for i, (A, B) in enumerate(factors))
        assert cap[k] == pytest.approx(dense, rel=1e-6)
    # ordering puts the energy first: the leading k x k block holds more than its share of k^2 / 36 entries
    for k in (1, 3):
        assert cap[k] >= cap[6] * k * k / 36
