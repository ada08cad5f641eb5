"""The dataset contract: stable integer ids, inputs, hidden labels, train/test splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
        if self.ids.ndim != 1 or len(self.ids) != len(self.X):
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
