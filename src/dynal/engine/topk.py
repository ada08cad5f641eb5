"""Streaming top-k with deterministic, generator-driven tie breaking."""

from __future__ import annotations

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def tie_keys(ids: np.ndarray, salt: int) -> np.ndarray:
    """Pseudo-random uint64 key per id (splitmix64 of ``id ^ salt``).

    A key depends only on the id and the salt, never on the id's position in the pool, so
    ties are broken the same way whatever the pool order.
    """
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64) ^ np.uint64(salt)
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return z ^ (z >> np.uint64(31))


def draw_salt(rng: np.random.Generator) -> int:
    """A tie-breaking salt drawn from the query's generator."""
    return int(rng.integers(0, 2**63, dtype=np.int64))


class StreamingTopK:
    """Keeps the ``k`` highest-scoring ids seen so far in O(k) memory.

    Order is by score, then by tie key (both descending), so the result does not depend on
    the order in which chunks arrive.
    """

    def __init__(self, k: int, salt: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k
        self.salt = salt
        self.ids = np.empty(0, dtype=np.int64)
        self.scores = np.empty(0, dtype=np.float64)
        self.keys = np.empty(0, dtype=np.uint64)

    def push(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """Offer a chunk of candidates."""
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(ids):
            raise ValueError(f"{len(scores)} scores for {len(ids)} ids")
        if np.isnan(scores).any():
            raise ValueError("a strategy returned NaN scores")
        if self.k == 0 or len(ids) == 0:
            return
        if len(self.ids) == self.k:  # drop candidates that cannot enter before hashing and sorting
            above = np.flatnonzero(scores >= self.scores[-1])
            ids, scores = ids[above], scores[above]
        if len(ids) > self.k:  # only the chunk's k best, and ties with its k-th, can enter
            kth = np.partition(scores, len(scores) - self.k)[len(scores) - self.k]
            best = np.flatnonzero(scores >= kth)
            ids, scores = ids[best], scores[best]
        keys = tie_keys(ids, self.salt)
        if len(self.ids) == self.k:
            enters = (scores > self.scores[-1]) | (keys > self.keys[-1])
            ids, scores, keys = ids[enters], scores[enters], keys[enters]
        if len(ids) == 0:
            return
        ids = np.concatenate([self.ids, ids])
        scores = np.concatenate([self.scores, scores])
        keys = np.concatenate([self.keys, keys])
        order = np.lexsort((~keys, -scores))[: self.k]
        self.ids, self.scores, self.keys = ids[order], scores[order], keys[order]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the kept candidates, best first."""
        return self.ids.copy(), self.scores.copy()


def argmax_tied(values: np.ndarray, keys: np.ndarray) -> int:
    """Position of the largest value; ties go to the largest tie key (see ``tie_keys``)."""
    top = np.flatnonzero(values == values.max())
    return int(top[np.argmax(keys[top])]) if len(top) > 1 else int(top[0])
