"""The exact dynamicAL set objective on the last layer, its greedy maximizer and the optimum.

With last-layer gradient factors ``r`` (N x K, ``p - e_y``) and ``h`` (N x d), a sample's
gradient is ``g_u = (r_u h_u^T, r_u)`` and the labeled set's is ``G_S = (A, a)``. Then

    G(S + Q) = ||A + sum_Q r_u h_u^T||_F^2 + ||a + sum_Q r_u||^2
    <g_u, g_v> = (r_u^T r_v) (h_u^T h_v + 1)

(drop the bias parts without a bias), so no N x (K d) matrix is ever formed.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from dynal.engine.topk import argmax_tied
from dynal.validation import is_integer


def _budget(budget: int, n: int) -> int:
    """The query size for a pool of ``n``: at most the pool; a clear error unless a
    non-negative integer."""
    if not is_integer(budget):
        raise TypeError(f"the query size must be an integer, got {budget!r}")
    if budget < 0:
        raise ValueError(f"the query size must be non-negative, got {budget}")
    return min(int(budget), n)


def set_value(r: np.ndarray, h: np.ndarray, A: np.ndarray, a: np.ndarray, bias: bool, chosen: np.ndarray) -> float:
    """``G(S + Q) = ||G_S + sum_{u in Q} g_u||^2`` for the rows ``chosen`` of ``r`` and ``h``.

    The rows are summed in increasing order, so a set has one value however it is listed (the
    sums' rounding would otherwise depend on the order, and a set could beat itself).
    """
    chosen = np.sort(np.asarray(chosen, dtype=np.int64))
    rq, hq = r[chosen], h[chosen]
    value = float(np.sum((A + rq.T @ hq) ** 2))
    if bias:
        value += float(np.sum((a + rq.sum(0)) ** 2))
    return value


def single_gains(r: np.ndarray, h: np.ndarray, A: np.ndarray, a: np.ndarray, bias: bool) -> np.ndarray:
    """``G(S + {u}) - G(S) = ||g_u||^2 + 2 <g_u, G_S>`` for every row."""
    b = 1.0 if bias else 0.0
    return np.einsum("nk,nk->n", r, r) * (np.einsum("nd,nd->n", h, h) + b) + 2 * np.einsum("nk,nk->n", r, h @ A.T + b * a)


def greedy(r: np.ndarray, h: np.ndarray, A: np.ndarray, a: np.ndarray, bias: bool, budget: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy maximization of ``G(S + Q)``: each step adds the sample with the largest marginal
    gain ``||g_u||^2 + 2 <R, g_u>``, ``R = G_S + sum of the chosen gradients``.

    Gains are updated with the factorized inner product in O(N (K + d)) per step. A budget
    larger than the pool takes the whole pool.

    Returns
    -------
    rows, gains : chosen rows in pick order and each one's marginal gain when picked
    """
    b = 1.0 if bias else 0.0
    gains = single_gains(r, h, A, a, bias)
    available = np.ones(len(r), dtype=bool)
    rows, picked_gains = [], []
    for _ in range(_budget(budget, len(r))):
        j = argmax_tied(np.where(available, gains, -np.inf), keys)
        rows.append(j)
        picked_gains.append(gains[j])
        available[j] = False
        gains = gains + 2 * (r @ r[j]) * (h @ h[j] + b)
    return np.array(rows, dtype=np.int64), np.array(picked_gains)


def marginal_gains(r: np.ndarray, h: np.ndarray, A: np.ndarray, a: np.ndarray, bias: bool, rows: np.ndarray) -> np.ndarray:
    """The gain each of ``rows`` adds to ``G`` when they are added in order (O(b K d))."""
    b = 1.0 if bias else 0.0
    M, m = A.astype(np.float64), a.astype(np.float64) * b
    gains = np.empty(len(rows))
    for i, j in enumerate(rows):
        gains[i] = (r[j] @ r[j]) * (h[j] @ h[j] + b) + 2 * (r[j] @ (M @ h[j]) + b * (r[j] @ m))
        M = M + np.outer(r[j], h[j])
        m = m + r[j]
    return gains


def top_b(r: np.ndarray, h: np.ndarray, A: np.ndarray, a: np.ndarray, bias: bool, budget: int, keys: np.ndarray) -> np.ndarray:
    """Rows of the ``budget`` largest single gains (dynamicAL's query), ties to larger keys; a
    budget larger than the pool takes the whole pool."""
    gains = single_gains(r, h, A, a, bias)
    return np.lexsort((~keys, -gains))[: _budget(budget, len(r))]


def exhaustive(r: np.ndarray, h: np.ndarray, A: np.ndarray, a: np.ndarray, bias: bool, budget: int) -> tuple[np.ndarray, float]:
    """The optimum of ``G(S + Q)`` over all subsets of size ``budget`` (for tiny pools; a budget
    larger than the pool takes the whole pool)."""
    budget = _budget(budget, len(r))
    if len(r) > 20 or budget > 4:
        raise ValueError(f"exhaustive search is for N <= 20 and b <= 4, got N={len(r)}, b={budget}")
    best, best_value = None, -np.inf
    for q in combinations(range(len(r)), budget):
        value = set_value(r, h, A, a, bias, np.array(q, dtype=np.int64))
        if value > best_value:
            best, best_value = np.array(q, dtype=np.int64), value
    return best, best_value
