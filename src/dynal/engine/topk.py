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
    """Keeps the ``k`` highest-scoring ids seen so far in O(k + buffer) memory.

    Order is by score, then by tie key (both descending), so the result does not depend on
    the order in which chunks arrive. A push only drops the candidates below the current floor
    (the k-th best score found so far) and buffers the rest; once more than ``buffer``
    candidates wait, they are merged with the kept ones, and only then are tie keys hashed and
    the best k sorted. So most pushes of a long pass cost a comparison and a copy.
    """

    def __init__(self, k: int, salt: int, buffer: int = 8192) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        self.k = k
        self.salt = salt
        self.buffer = buffer
        self.ids = np.empty(0, dtype=np.int64)  # the best k after the last merge, best first
        self.scores = np.empty(0, dtype=np.float64)
        self.floor = -np.inf  # no candidate scoring below it can enter
        self._waiting: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_waiting = 0

    def push(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """Offer a chunk of candidates."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(ids):
            raise ValueError(f"{len(scores)} scores for {len(ids)} ids")
        if np.isnan(scores).any():
            raise ValueError("a strategy returned NaN scores: check the pool inputs and the model's outputs on them for NaN or infinite values")
        if self.k == 0:
            return
        if self.floor > -np.inf:  # indexing copies, and the caller may reuse its arrays
            above = np.flatnonzero(scores >= self.floor)
            ids, scores = ids[above], scores[above]
        else:
            ids, scores = ids.copy(), scores.copy()
        if len(ids) == 0:
            return
        self._waiting.append((ids, scores))
        self._n_waiting += len(ids)
        if self._n_waiting > self.buffer:
            self._merge()

    def _merge(self) -> None:
        """Merge the waiting candidates into the best k and raise the floor."""
        if not self._waiting:
            return
        ids = np.concatenate([self.ids, *(i for i, _ in self._waiting)])
        scores = np.concatenate([self.scores, *(s for _, s in self._waiting)])
        self._waiting, self._n_waiting = [], 0
        if len(ids) > self.k:  # only the k best, and ties with the k-th, can stay
            kth = np.partition(scores, len(scores) - self.k)[len(scores) - self.k]
            best = np.flatnonzero(scores >= kth)
            ids, scores = ids[best], scores[best]
        order = np.lexsort((~tie_keys(ids, self.salt), -scores))[: self.k]
        self.ids, self.scores = ids[order], scores[order]
        if len(self.ids) == self.k:
            self.floor = self.scores[-1]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the kept candidates, best first."""
        self._merge()
        return self.ids.copy(), self.scores.copy()


def argmax_tied(values: np.ndarray, keys: np.ndarray) -> int:
    """Position of the largest value; ties go to the largest tie key (see ``tie_keys``)."""
    best = values.max()
    if np.isnan(best):
        raise ValueError(f"cannot pick the largest of values with NaN (at position {int(np.flatnonzero(np.isnan(values))[0])})")
    top = np.flatnonzero(values == best)
    return int(top[np.argmax(keys[top])]) if len(top) > 1 else int(top[0])
