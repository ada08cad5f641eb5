"""Helpers of the set strategies: the pool pass gathered into compact per-sample arrays, and
squared distances cleaned of rounding noise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dynal.strategies.base import Chunks


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


def distinct_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows ``U`` of a float64 matrix and, per row of ``X``, its row of ``U``
    (bitwise-equal rows share one), found by a hash of each row's bits.

    A matrix product rounds a row by its place in the matrix, so exact copies computed as rows
    of ``U`` are the only way to get exactly equal results for them.
    """
    key = np.zeros(len(X), dtype=np.uint64)
    for column in np.ascontiguousarray(X, dtype=np.float64).view(np.uint64).T:  # FNV-style mixing
        key ^= column
        key *= np.uint64(0x100000001B3)
    _, first, row = np.unique(key, return_index=True, return_inverse=True)
    row = row.reshape(-1)
    copy = np.flatnonzero(first[row] != np.arange(len(X)))
    if not np.array_equal(X[copy], X[first[row[copy]]]):  # a shared hash, different rows: sort them
        U, row = np.unique(X, axis=0, return_inverse=True)
        return U, row.reshape(-1)
    return X[first], row

