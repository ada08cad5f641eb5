"""Coreset: greedy k-center selection on penultimate features (Sener & Savarese, ICLR 2018)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dynal.engine.topk import argmax_tied, draw_salt, tie_keys
from dynal.strategies.base import Chunks, Strategy
from dynal.strategies.collect import distinct_rows, floor_sq_dists, gather

# Largest block of pairwise distances formed at once, in entries (8 MB of float64).
_BLOCK = 1 << 20


def min_sq_dists(X: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance from each row of ``X`` to its nearest centre (inf if none).

    Computed block by block as ``||x||² + ||c||² - 2 x·c``, so memory is O(len(X)) plus one
    bounded block and the work is matrix products.
    """
    out = np.full(len(X), np.inf)
    xx = np.einsum("nd,nd->n", X, X)
    cols = max(1, min(len(centres), 4096))
    rows = max(1, _BLOCK // cols)
    for j in range(0, len(centres), cols):
        C = centres[j : j + cols]
        cc = np.einsum("nd,nd->n", C, C)
        for i in range(0, len(X), rows):
            scale = xx[i : i + rows, None] + cc
            d2 = floor_sq_dists(scale - 2.0 * (X[i : i + rows] @ C.T), scale)
            np.minimum(out[i : i + rows], d2.min(axis=1), out=out[i : i + rows])
    return out


class Coreset(Strategy):
    """Greedy k-center (Coreset): repeatedly pick the pool sample farthest from every centre.

    Centres start as the labeled set's penultimate features; each pick becomes a centre. Only
    the pool's features (N x d, float64) and the running min-distance vector (N) are kept, so
    memory is O(N·d), never N×N; a query costs O((L + b)·N·d) for L labeled samples, as
    matrix-vector products over the distinct feature rows, so that exact copies tie exactly.
    Ties (e.g. duplicate features) go to the generator's per-id tie keys. The score of a pick
    is its distance to the nearest centre when it was picked.
    """

    name = "coreset"
    outputs = ("features",)
    labeled = ("labeled_outputs",)

    def select(self, chunks: Chunks, stats: Mapping[str, Any], budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ids, arrays = gather(chunks, ["features"])
        X = arrays.pop("features").astype(np.float64)
        # distances do not change under a shift, and their expanded form is accurate to the
        # features' spread only once their common offset is taken out
        shift = X.mean(axis=0)
        X -= shift
        # distances are computed once per distinct row, so that exact copies tie exactly and
        # the tie keys decide among them
        U, row = distinct_rows(X)
        del X
        budget = min(budget, len(ids))
        keys = tie_keys(ids, draw_salt(rng))
        d2 = min_sq_dists(U, np.asarray(stats["labeled_features"], dtype=np.float64) - shift)[row]
        uu = np.einsum("nd,nd->n", U, U)
        picks, scores = np.empty(budget, dtype=np.int64), np.empty(budget)
        for step in range(budget):
            i = argmax_tied(d2, keys)
            picks[step], scores[step] = i, np.sqrt(d2[i])
            scale = uu + uu[row[i]]
            np.minimum(d2, floor_sq_dists(scale - 2.0 * (U @ U[row[i]]), scale)[row], out=d2)
            d2[i] = -np.inf  # never picked twice, even among duplicates
        return ids[picks], scores
