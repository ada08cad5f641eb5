import gzip

import numpy as np
import pytest

from dynal.data import Dataset, Split, from_arrays, load_arrays, load_dataset
from dynal.data.arrays import stratified_split
from dynal.data.builtin import fashion_mnist


def test_blobs_is_seeded_with_disjoint_stable_ids():
    a = load_dataset("blobs", n=300, d=4, k=3, seed=5)
    b = load_dataset("blobs", n=300, d=4, k=3, seed=5)
    np.testing.assert_array_equal(a.train.X, b.train.X)
    assert len(a.train) + len(a.test) == 300
    assert not np.intersect1d(a.train.ids, a.test.ids).size
    assert a.n_classes == 3 and a.input_shape == (4,)
    c = load_dataset("blobs", n=300, d=4, k=3, seed=6)
    assert not np.array_equal(a.train.X, c.train.X)


def test_digits_and_mnist5k_shapes():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and d.n_classes == 10
    assert len(d.train) + len(d.test) == 1797
    assert 0.0 <= d.train.X.min() and d.train.X.max() <= 1.0
    m = load_dataset("mnist-5k")
    assert m.input_shape == (1, 28, 28) and len(m.train) + len(m.test) == 5000
    assert set(np.unique(m.test.y)) == set(range(10))


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (7, 28, 28)), np.arange(7) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs[:3])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:3])
    d = fashion_mnist(tmp_path)
    assert d.input_shape == (1, 28, 28) and d.n_classes == 10
    np.testing.assert_allclose(d.train.X[:, 0] * 255, imgs, atol=1e-3)
    np.testing.assert_array_equal(d.test.ids, [7, 8, 9])


def test_fashion_mnist_missing_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist(tmp_path)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("cifar-10")


def test_from_arrays_validates_input():
    X, y = np.zeros((10, 3)), np.arange(10) % 2
    with pytest.raises(ValueError, match="10 rows but y has 9"):
        from_arrays(X, y[:9])
    bad = X.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf.*row 4"):
        from_arrays(bad, y)
    bad[4, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        from_arrays(bad, y)
    with pytest.raises(ValueError, match="negative"):
        from_arrays(X, y - 1)
    with pytest.raises(ValueError, match="integer"):
        from_arrays(X, y + 0.5)
    with pytest.raises(ValueError, match="outside the class range"):
        from_arrays(X, y * 3, n_classes=3)
    with pytest.raises(ValueError, match="label 1e\\+19, outside any class range"):
        from_arrays(X, np.where(y == 1, 1e19, 0.0))
    with pytest.raises(ValueError, match="X has no rows"):
        from_arrays(X[:0], y[:0])
    with pytest.raises(ValueError, match="leaves the test split empty"):
        from_arrays(X[:3], y[:3], test_fraction=0.1)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="test_fraction must be in"):
            load_dataset("blobs", n=30, test_fraction=fraction)


def test_from_arrays_explicit_test_set_and_class_count():
    X, y = np.ones((8, 2)), np.array([0, 1] * 4)
    d = from_arrays(X, y, X[:3], y[:3], n_classes=5)
    assert d.n_classes == 5
    np.testing.assert_array_equal(d.train.ids, np.arange(8))
    np.testing.assert_array_equal(d.test.ids, [8, 9, 10])


def test_npz_and_npy_files(tmp_path):
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    np.savez(tmp_path / "d.npz", X=X, y=y)
    d = load_dataset(str(tmp_path / "d.npz"))
    assert len(d.train) + len(d.test) == 20 and d.n_classes == 2
    with pytest.raises(ValueError, match="labels= is for .npy inputs"):
        load_arrays(tmp_path / "d.npz", labels=tmp_path / "y.npy")
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", y)
    d2 = load_arrays(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    np.testing.assert_array_equal(d.train.ids, d2.train.ids)
    with pytest.raises(ValueError, match="labels="):
        load_arrays(tmp_path / "x.npy")
    np.savez(tmp_path / "bad.npz", X=X)
    with pytest.raises(ValueError, match=r"lacks arrays \['y'\]"):
        load_arrays(tmp_path / "bad.npz")


def test_split_positions_rejects_unknown_ids(blobs):
    ids = blobs.train.ids[[5, 0, 3]]
    np.testing.assert_array_equal(blobs.train.ids[blobs.train.positions(ids)], ids)
    with pytest.raises(KeyError, match="not in this dataset"):
        blobs.train.positions(np.array([10**9]))


def test_stratified_split_holds_out_the_fraction_of_every_class():  # D1, D2
    y = np.repeat([0, 1, 2], [7, 12, 18])
    for seed in range(5):
        train, test = stratified_split(y, 0.2, seed)
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
        for k, size in enumerate((7, 12, 18)):
            assert abs(np.sum(y[test] == k) - 0.2 * size) <= 0.5  # the nearest count


def test_a_split_built_by_hand_is_checked_and_takes_float32_inputs():
    split = Split(np.array([3, 1]), np.ones((2, 2)), np.array([0.0, 1.0]))  # float64 inputs, float labels
    assert split.X.dtype == np.float32 and split.y.dtype == np.int64 and split.ids.dtype == np.int64
    X = np.ones((2, 2))
    X[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf values in 1 rows, first at row 1"):
        Split(np.array([3, 1]), X, None)
    with pytest.raises(ValueError, match="ids must be a one-dimensional array of integers"):
        Split(np.array([3.0, 1.0]), np.ones((2, 2)), None)
    with pytest.raises(ValueError, match="integer class indices"):
        Split(np.array([3, 1]), np.ones((2, 2)), np.array([0.5, 1.0]))
    assert len(Split(np.zeros(0, np.int64), np.zeros((0, 2)), None)) == 0  # an empty split is one


@pytest.mark.parametrize("params, message", [
    ({"spread": float("nan")}, "finite spread"), ({"spread": float("inf")}, "finite spread"), ({"spread": -1.0}, "finite spread"),
    ({"n": 100.5}, "integers n"), ({"k": 2.0}, "integers n"),
])
def test_blobs_refuses_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("blobs", **params)


def test_a_dataset_name_that_is_not_a_string_is_a_clear_error():
    with pytest.raises(TypeError, match="the dataset name must be a string, got 5"):
        load_dataset(5)


def test_positions_of_unsorted_ids_and_id_checks():  # D3, D4, D5
    split = Split(np.array([30, 10, 20]), np.zeros((3, 2), np.float32), np.array([0, 1, 0]))
    np.testing.assert_array_equal(split.positions(np.array([20, 30, 10])), [2, 0, 1])
    with pytest.raises(ValueError, match="unique"):
        Split(np.array([1, 1]), np.zeros((2, 2), np.float32), None)
    other = Split(np.array([10, 40]), np.zeros((2, 2), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="overlap"):
        Dataset("d", split, other, 2)


def test_ids_are_rows_of_X_and_the_class_count_sees_the_test_labels():  # D8, D7
    X, y = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 2
    d = from_arrays(X, y)
    np.testing.assert_array_equal(d.train.X, X[d.train.ids])
    np.testing.assert_array_equal(d.test.X, X[d.test.ids])
    assert from_arrays(X, y, X[:3], np.array([0, 2, 1])).n_classes == 3
