"""User data from numpy arrays and ``.npy``/``.npz`` files, with input validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dynal.data.dataset import Dataset, Split, check_inputs, check_labels


def from_arrays(
    X: np.ndarray,
    y: np.ndarray,
    X_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    *,
    n_classes: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str = "arrays",
) -> Dataset:
    """Build a :class:`Dataset` from arrays.

    Ids are row numbers: with an explicit test set, train ids are ``0..N-1`` (the rows of ``X``)
    and test ids ``N..`` follow on; without one, a stratified ``test_fraction`` of ``X`` is held
    out with ``seed``, and each sample keeps its row of ``X`` as its id, in either split.
    """
    X = check_inputs(X, "X")
    y = check_labels(y, n_classes, what="y")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
    if (X_test is None) != (y_test is None):
        raise ValueError("give both X_test and y_test, or neither")
    if X_test is not None:
        X_test = check_inputs(X_test, "X_test")
        y_test = check_labels(y_test, n_classes, what="y_test")
        if len(X_test) != len(y_test):
            raise ValueError(f"X_test has {len(X_test)} rows but y_test has {len(y_test)} labels")
        if X_test.shape[1:] != X.shape[1:]:
            raise ValueError(f"X_test rows have shape {X_test.shape[1:]}, X rows {X.shape[1:]}")
        ids = np.arange(len(X) + len(X_test), dtype=np.int64)
        train, test = Split(ids[: len(X)], X, y), Split(ids[len(X):], X_test, y_test)
    else:
        train_pos, test_pos = stratified_split(y, test_fraction, seed)
        train = Split(train_pos.astype(np.int64), X[train_pos], y[train_pos])
        test = Split(test_pos.astype(np.int64), X[test_pos], y[test_pos])
    k = n_classes if n_classes is not None else int(max(train.y.max(), test.y.max())) + 1
    return Dataset(name=name, train=train, test=test, n_classes=k)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) positions with ``test_fraction`` of each class in test; both must
    be non-empty."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for k in np.unique(y):
        members = np.flatnonzero(y == k)
        n_test = int(round(test_fraction * len(members)))
        test.append(rng.choice(members, size=n_test, replace=False))
    test_pos = np.sort(np.concatenate(test))
    train_pos = np.setdiff1d(np.arange(len(y)), test_pos)
    for name, part in (("test", test_pos), ("train", train_pos)):
        if len(part) == 0:
            raise ValueError(f"test_fraction {test_fraction} of {len(y)} samples leaves the {name} split empty")
    return train_pos, test_pos


def load_arrays(path: str | Path, labels: str | Path | None = None, **kwargs) -> Dataset:
    """Load a dataset from ``.npz`` (keys ``X``, ``y``, optional ``X_test``, ``y_test``)
    or from a ``.npy`` inputs file with a ``.npy`` labels file given as ``labels``.
    Other keyword arguments go to :func:`from_arrays`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".npz":
        if labels is not None:
            raise ValueError(f"{path} holds its labels as 'y'; labels= is for .npy inputs")
        with np.load(path, allow_pickle=False) as f:
            missing = {"X", "y"} - set(f.files)
            if missing:
                raise ValueError(f"{path} lacks arrays {sorted(missing)}; it has {sorted(f.files)}")
            arrays = {k: f[k] for k in ("X", "y", "X_test", "y_test") if k in f.files}
        return from_arrays(**arrays, name=kwargs.pop("name", path.stem), **kwargs)
    if path.suffix == ".npy":
        if labels is None:
            raise ValueError(f"{path} holds inputs only: pass labels=<labels .npy file>")
        X = np.load(path, allow_pickle=False)
        y = np.load(labels, allow_pickle=False)
        return from_arrays(X, y, name=kwargs.pop("name", path.stem), **kwargs)
    raise ValueError(f"unsupported file type {path.suffix!r}: use .npz or .npy")
