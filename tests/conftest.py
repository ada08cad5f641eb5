"""Shared tiny fixtures: CI-fast synthetic data and small models."""

from __future__ import annotations

import numpy as np
import pytest

from dynal import TrainConfig, load_dataset, model_factory


@pytest.fixture(scope="session")
def blobs():
    return load_dataset("blobs", n=240, d=6, k=3, seed=1)


@pytest.fixture(scope="session")
def mlp_factory(blobs):
    return model_factory("mlp", blobs.input_shape, blobs.n_classes, hidden=[16])


@pytest.fixture
def fast_train():
    return TrainConfig(epochs=3, batch_size=32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
