"""Split a collection into clusters, each with its own shared bases (k-subspaces clustering).

Adapters whose updates live in different subspaces waste a shared basis on each other; giving each
group its own (U_c, V_c) lowers everyone's error at the cost of one basis per cluster.

Alternating, on a sample of modules (evenly spaced; every module when there are few):
  1. fit JD-Full bases per cluster on its members (loose tolerance);
  2. reassign each adapter to the cluster whose bases capture the largest share of its update,
     summed over sample modules:  sum_m ||U_cm.T dW_im V_cm||^2 / ||dW_im||^2
     (for orthonormal U, V this is 1 - relative error^2 on that module, so argmax = least error);
  3. an emptied cluster takes the adapter worst served by its current cluster.
Starts from farthest-point seeding (k-means++ in subspace terms, seeded); stops when assignments
repeat or after ``rounds``.
"""

from __future__ import annotations

import numpy as np
import torch

from soppu_client.compress.jd_full import fit_jd_full
from soppu_client.compress.stack import stack_factors


def _captured_share(stack, Us: list[torch.Tensor], Vs: list[torch.Tensor]) -> torch.Tensor:
    """[N, C]: ||U_c.T dW_i V_c||^2 / ||dW_i||^2 for every adapter i in ``stack`` and every basis pair c
    (float64). All C pairs in one GEMM per side (B_i.T [U_1..U_C], A_i [V_1..V_C]): one wide
    product instead of C thin ones over the N r stacked rows."""
    n, r, c, k = stack.n, stack.r, len(Us), Us[0].shape[1]
    left = stack.project_left(torch.cat(Us, dim=1)).reshape(n, r, c, k)  # B_i.T U_c
    right = stack.project_right(torch.cat(Vs, dim=1)).reshape(n, r, c, k)  # A_i V_c
    core = torch.einsum("nrck,nrcl->nckl", left, right)  # U_c.T dW_i V_c: [N, C, k, k]
    energy = (core.double() ** 2).sum((2, 3))
    sq = stack.sq_norms.view(-1, 1)
    return torch.where(sq > 0, energy / sq.clamp_min(1e-300), torch.ones_like(energy))


def _score(stacks, n: int, groups: list[list[int]], rank: int, seed: int) -> torch.Tensor:
    """[N, len(groups)]: captured share of every adapter by each group's bases, summed over stacks."""
    score = torch.zeros(n, len(groups), dtype=torch.float64)
    for stack in stacks:
        fits = [fit_jd_full(stack.subset(members), rank, tol=1e-3, max_iter=20, seed=seed + c)
                for c, members in enumerate(groups)]
        score += _captured_share(stack, [f[0] for f in fits], [f[1] for f in fits])
    return score


def _farthest_seeding(stacks, n: int, n_clusters: int, rank: int, seed: int) -> np.ndarray:
    """k-means++-style start: seed adapters chosen greedily as the one worst captured by the
    bases of the seeds so far (the first one at random), then everyone joins its best seed."""
    rng = np.random.default_rng(seed)
    seeds = [int(rng.integers(n))]
    score = _score(stacks, n, [[seeds[0]]], rank, seed)
    while len(seeds) < n_clusters:
        best = score.max(1).values
        best[seeds] = float("inf")
        seeds.append(int(best.argmin()))
        score = torch.cat([score, _score(stacks, n, [[seeds[-1]]], rank, seed)], dim=1)
    assign = score.argmax(1).numpy()
    assign[seeds] = np.arange(n_clusters)
    return assign


def assign_clusters(
    collection, n_clusters: int, rank: int, *, seed: int = 0, sample_modules: int = 6, rounds: int = 6,
    weighting: str = "equal", dtype=torch.float32,
) -> list[int]:
    """Cluster index per adapter (collection order), deterministic for ``seed``."""
    n = len(collection.names)
    if n_clusters <= 1 or n <= 1:
        return [0] * n
    n_clusters = min(n_clusters, n)
    modules = collection.modules
    pick = np.unique(np.linspace(0, len(modules) - 1, num=min(sample_modules, len(modules))).round().astype(int))
    stacks = [stack_factors(collection.module_factors(modules[i]), weighting, dtype) for i in pick]
    assign = _farthest_seeding(stacks, n, n_clusters, rank, seed)
    for _ in range(rounds):
        score = _score(stacks, n, [np.flatnonzero(assign == c).tolist() for c in range(n_clusters)], rank, seed)
        new = score.argmax(1).numpy()
        sizes = np.bincount(new, minlength=n_clusters)
        for c in np.flatnonzero(sizes == 0):  # keep every cluster populated (O(N) per empty cluster)
            served = score[torch.arange(n), torch.from_numpy(new)].numpy()
            i = next(i for i in np.argsort(served) if sizes[new[i]] > 1)
            sizes[new[i]] -= 1
            sizes[c] += 1
            new[i] = c
        if np.array_equal(new, assign):
            break
        assign = new
    # number clusters by first appearance so the output does not depend on label order
    order = {c: j for j, c in enumerate(dict.fromkeys(assign.tolist()))}
    return [order[c] for c in assign.tolist()]
