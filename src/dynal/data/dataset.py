"""The dataset contract: stable integer ids, inputs, hidden labels, train/test splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def check_inputs(X: np.ndarray, what: str = "X", allow_empty: bool = False) -> np.ndarray:
    """Return ``X`` as float32, raising on a bad shape or non-finite values (or no rows, unless
    ``allow_empty``)."""
    X = np.asarray(X)
    if X.ndim < 2:
        raise ValueError(f"{what} must have a sample axis and at least one feature axis, got shape {X.shape}")
    if len(X) == 0 and not allow_empty:
        raise ValueError(f"{what} has no rows")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{what} must be real numbers, got dtype {X.dtype}")
    X = X.astype(np.float32, copy=False)
    bad = ~np.isfinite(X).reshape(len(X), -1).all(axis=1) if len(X) else np.zeros(0, dtype=bool)
    if bad.any():
        raise ValueError(f"{what} has NaN or inf values in {int(bad.sum())} rows, first at row {int(np.argmax(bad))}")
    return X


def check_labels(y: np.ndarray, n_classes: int | None = None, what: str = "y") -> np.ndarray:
    """Return ``y`` as int64 class indices, raising on non-integers or out-of-range values."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.mod(y, 1) == 0):
            raise ValueError(f"{what} must hold integer class indices, got dtype {y.dtype}")
        if np.abs(y).max() >= 2**62:
            raise ValueError(f"{what} has label {y.flat[np.abs(y).argmax()]:g}, outside any class range")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{what} has negative labels, e.g. {int(y.min())}")
    if n_classes is not None and y.size and y.max() >= n_classes:
        raise ValueError(f"{what} has label {int(y.max())} outside the class range [0, {n_classes - 1}]")
    return y


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes
    ----------
    ids : (N,) int64
        Stable dataset-wide ids; never positions in a pool.
    X : (N, ...) float32
        Inputs, images as (N, C, H, W), vectors as (N, D).
    y : (N,) int64 or None
        Labels, hidden from strategies; ``None`` when the split is unlabeled.
    """

    ids: np.ndarray
    X: np.ndarray
    y: np.ndarray | None

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a one-dimensional array of integers, got dtype {ids.dtype} and shape {ids.shape}")
        object.__setattr__(self, "ids", ids.astype(np.int64, copy=False))
        object.__setattr__(self, "X", check_inputs(self.X, allow_empty=True))
        if self.y is not None:
            object.__setattr__(self, "y", check_labels(self.y))
        if len(self.ids) != len(self.X):
            raise ValueError(f"ids has {len(self.ids)} entries but X has {len(self.X)} rows")
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("ids must be unique")
        if self.y is not None and len(self.y) != len(self.X):
            raise ValueError(f"X has {len(self.X)} rows but y has {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ``ids`` in this split; raises if any id is not in it."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        where = np.searchsorted(self.ids, ids, sorter=order)
        where = np.minimum(where, len(self.ids) - 1)
        pos = order[where]
        missing = self.ids[pos] != ids
        if missing.any():
            raise KeyError(f"ids not in this dataset: {ids[missing][:10].tolist()}")
        return pos


@dataclass(frozen=True)
class Dataset:
    """A classification dataset with a train split (the pool) and a test split.

    Attributes
    ----------
    name : str
    train, test : Split
        Ids are disjoint across the two splits.
    n_classes : int
        The class count of the task; models always get this many outputs, whatever
        labels have been seen so far.
    """

    name: str
    train: Split
    test: Split
    n_classes: int

    def __post_init__(self) -> None:
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {self.n_classes}")
        if np.intersect1d(self.train.ids, self.test.ids).size:
            raise ValueError("train and test ids overlap")
        for split, label in ((self.train, "train"), (self.test, "test")):
            if split.y is not None and len(split.y) and (split.y.min() < 0 or split.y.max() >= self.n_classes):
                raise ValueError(f"{label} labels must lie in [0, {self.n_classes - 1}]")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dimension)."""
        return tuple(self.train.X.shape[1:])
