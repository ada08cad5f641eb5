"""Helpers of the set strategies: the pool pass gathered into compact per-sample arrays,
squared distances cleaned of rounding noise, and exact copies among rows grouped."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dynal.strategies.base import Chunks

# Rows hashed at once in :func:`distinct_rows`, in elements (8 MB of uint64).
_BLOCK = 1 << 20


def gather(chunks: Chunks, names: Sequence[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Concatenate the named per-sample outputs of a pool pass (default: all of them).

    Returns
    -------
    ids, arrays : the pool's dataset ids and one array per name, rows aligned with ``ids``
    """
    ids: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names or ()}
    for chunk in chunks:
        ids.append(chunk["ids"])
        for name in names or [k for k in chunk if k != "ids"]:
            parts.setdefault(name, []).append(chunk[name])
    if not ids:
        raise ValueError("the pool is empty")
    arrays = {name: np.concatenate(p) for name, p in parts.items()}
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise ValueError(f"the pool output {name!r} contains NaN or infinite values")
    return np.concatenate(ids), arrays


def floor_sq_dists(d2: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Zero, in place, squared distances within rounding of zero (``<= 1e-10 * scale``).

    A squared distance expanded as ``||a||² + ||b||² - 2 a·b`` (scale ``||a||² + ||b||²``) is
    off by rounding; identical points must get exactly 0 (and never a negative value).
    """
    d2[d2 <= 1e-10 * scale] = 0.0
    return d2


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 words, in place (modulo 2^64)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def distinct_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows ``U`` of a float64 matrix and, per row of ``X``, its row of ``U``
    (equal rows share one; ``U`` is ``X`` itself when all rows differ), found by a hash of
    each row's bits (``-0.0`` taken as ``0.0``) and checked.

    A matrix product rounds a row by its place in the matrix, so exact copies computed as rows
    of ``U`` are the only way to get exactly equal results for them.
    """
    d = X.shape[1]
    weight = _mix(np.arange(1, d + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    key = np.empty(len(X), dtype=np.uint64)
    step = max(1, _BLOCK // max(1, d))
    for a in range(0, len(X), step):  # each word mixed, times a random odd weight per column
        key[a : a + step] = (_mix((X[a : a + step] + 0.0).view(np.uint64)) * weight).sum(axis=1, dtype=np.uint64)
    _, first, row = np.unique(key, return_index=True, return_inverse=True)
    row = row.reshape(-1)
    if len(first) == len(X):
        return X, np.arange(len(X))
    copy = np.flatnonzero(first[row] != np.arange(len(X)))
    for a in range(0, len(copy), step):
        rows = copy[a : a + step]
        if not np.array_equal(X[rows], X[first[row[rows]]]):  # a shared hash, different rows
            U, row = np.unique(X, axis=0, return_inverse=True)
            return U, row.reshape(-1)
    return X[first], row
