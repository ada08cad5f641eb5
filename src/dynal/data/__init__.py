"""Datasets: the contract, builtins by name, and user arrays."""

from dynal.data.arrays import from_arrays, load_arrays
from dynal.data.builtin import DATASETS, blobs, digits, fashion_mnist, load_dataset, mnist_5k
from dynal.data.dataset import Dataset, Split

__all__ = [
    "DATASETS",
    "Dataset",
    "Split",
    "blobs",
    "digits",
    "fashion_mnist",
    "from_arrays",
    "load_arrays",
    "load_dataset",
    "mnist_5k",
]
