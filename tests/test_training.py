"""Training and evaluation on the labeled set."""

import copy
import time
import warnings

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dynal import TrainConfig, model_factory
from dynal.resources import Measure
from dynal.training import build_model, evaluate, fit, predict_proba


def _data(n, shape=(6,), k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), np.arange(n) % k


def test_batches_of_one_sample_train_and_batchnorm_models_take_them():
    X, y = _data(12)
    model = build_model(model_factory("mlp", (6,), 3, hidden=[8]), np.random.default_rng(0))
    before = [p.detach().clone() for p in model.parameters()]
    sizes = []
    model.register_forward_pre_hook(lambda m, inputs: sizes.append(len(inputs[0])) if m.training else None)
    fit(model, X, y, TrainConfig(epochs=2, batch_size=1, lr=0.1), np.random.default_rng(0))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sizes == [1] * 24  # one step per sample
    for name in ("resnet18", "vgg11"):  # 1x1 maps at the end: a batch of one has one value per channel
        Xi, yi = _data(1, (1, 8, 8))
        model = build_model(model_factory(name, (1, 8, 8), 3, width=0.125), np.random.default_rng(0))
        fit(model, Xi, yi, TrainConfig(epochs=1), np.random.default_rng(0))
        assert not model.training


def test_the_reported_loss_covers_every_sample_including_a_lone_last_one():
    X, y = _data(11)
    model = build_model(model_factory("mlp", (6,), 3, hidden=[8]), np.random.default_rng(1))
    with torch.no_grad():
        want = float(F.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y)))
    got = fit(model, X, y, TrainConfig(epochs=1, batch_size=10, lr=1e-12), np.random.default_rng(0)).final_loss
    assert got == pytest.approx(want, rel=1e-5)


def test_labels_and_shapes_are_checked():
    X, y = _data(10)
    model = build_model(model_factory("mlp", (6,), 3, hidden=[8]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="integer class indices"):
        fit(model, X, np.full(10, 0.7), TrainConfig(epochs=1), np.random.default_rng(0))
    with pytest.raises(ValueError, match="outside the class range"):
        fit(model, X, y + 1, TrainConfig(epochs=1), np.random.default_rng(0))
    with pytest.raises(ValueError, match="one-dimensional"):
        evaluate(model, X, y[:, None])
    with pytest.raises(ValueError, match="10 rows but y has 1 labels"):
        evaluate(model, X, y[:1])


def test_the_hold_out_is_never_empty_nor_everything():
    X, y = _data(10)
    model = build_model(model_factory("mlp", (6,), 3, hidden=[8]), np.random.default_rng(0))
    for fraction in (0.01, 0.95):
        assert fit(model, X, y, TrainConfig(epochs=1, val_fraction=fraction), np.random.default_rng(0)).val_accuracy is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, X[:1], y[:1], TrainConfig(epochs=1, val_fraction=0.5), np.random.default_rng(0))
    assert result.val_accuracy is None and "hold-out" in str(caught[0].message)


@pytest.mark.parametrize(
    "field, value, message",
    [("weight_decay", -1.0, "weight_decay"), ("lr", float("nan"), "lr"), ("lr", float("inf"), "lr"), ("momentum", 1.0, "momentum")],
)
def test_train_config_ranges(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_a_measure_times_several_blocks():
    m = Measure()
    with m:
        pass
    with m:
        block = np.ones(40_000_000)  # 320 MB, touched, and freed before the block ends:
        time.sleep(0.05)  # only the sampling thread can see it
        last = block[-1]
        del block
    assert m.peak_bytes > 200e6 and last == 1.0


def test_predict_proba_runs_cache_sized_forward_passes_with_the_same_result(monkeypatch):
    from dynal.models import SmallCNN

    torch.manual_seed(9)
    model = SmallCNN((1, 8, 8), 3, width=4, hidden=8)
    X = np.random.default_rng(9).normal(size=(10, 1, 8, 8)).astype(np.float32)
    whole = predict_proba(model, X, batch_size=len(X))
    monkeypatch.setattr("dynal.engine.modes._ACTIVATION_BYTES", 4 * 4 * 8 * 8 * 4)  # 4 samples per pass
    calls = []
    model.body.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    np.testing.assert_allclose(predict_proba(model, X), whole, rtol=1e-5, atol=1e-7)
    assert calls == [2, 4, 4, 2]  # the two-sample measurement, then the passes


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fit_draws_dropout_from_the_generator_not_torchs_global_rng():  # T2
    X, y = _data(12)
    factory = model_factory("mlp", (6,), 3, hidden=[8], dropout=0.5)
    out = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = build_model(factory, np.random.default_rng(0))
        fit(model, X, y, TrainConfig(epochs=2, batch_size=4), np.random.default_rng(5))
        out.append(_flat(model))
    assert torch.equal(out[0], out[1])


def test_build_model_leaves_torchs_global_rng_alone_and_follows_the_generator():  # T3, T11
    factory = model_factory("mlp", (6,), 3, hidden=[8])
    torch.manual_seed(123)  # a state that no earlier build_model can have left behind
    state = torch.get_rng_state()
    a = build_model(factory, np.random.default_rng(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(_flat(a), _flat(build_model(factory, np.random.default_rng(0))))
    assert not torch.equal(_flat(a), _flat(build_model(factory, np.random.default_rng(1))))


def test_one_full_batch_sgd_matches_a_hand_written_momentum_update():  # T7 (mean loss), T8 (momentum)
    X, y = _data(10)
    model = build_model(model_factory("mlp", (6,), 3, hidden=[8]), np.random.default_rng(0))
    ref = copy.deepcopy(model)
    lr, mom = 0.1, 0.9
    fit(model, X, y, TrainConfig(epochs=2, batch_size=64, optimizer="sgd", lr=lr, momentum=mom), np.random.default_rng(0))
    params = list(ref.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    for _ in range(2):
        grads = torch.autograd.grad(F.cross_entropy(ref(torch.from_numpy(X)), torch.from_numpy(y)), params)
        with torch.no_grad():
            for p, v, g in zip(params, velocity, grads):
                v.mul_(mom).add_(g)
                p.sub_(lr * v)
    torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-4, atol=1e-5)


def test_the_hold_out_is_not_trained_on_and_its_best_epoch_is_kept():  # T6, T5
    X, y = _data(40, seed=3)
    y = np.random.default_rng(4).integers(0, 3, 40)  # noise: the validation accuracy wanders
    config = TrainConfig(epochs=15, batch_size=8, lr=0.05, val_fraction=0.25)
    n_val = 10
    val = np.sort(np.random.default_rng(11).permutation(40)[:n_val])  # fit's first draw from rng
    models, results = [], []
    for labels in (y, np.where(np.isin(np.arange(40), val), (y + 1) % 3, y)):  # only hold-out labels change
        model = build_model(model_factory("mlp", (6,), 3, hidden=[16]), np.random.default_rng(0))
        results.append(fit(model, X, labels, config, np.random.default_rng(11)))
        models.append(model)
    assert results[0].history == results[1].history  # training never saw the hold-out labels
    assert evaluate(models[0], X[val], y[val]) == results[0].val_accuracy  # the best epoch's weights


def test_the_reported_loss_is_the_kept_epochs(monkeypatch):
    # with a hold-out the best epoch's weights are kept: the loss reported is that epoch's, not
    # the last one's; without one, the last epoch's
    import dynal.training

    X, y = _data(40, seed=3)
    y = np.random.default_rng(4).integers(0, 3, 40)
    accuracies = []
    monkeypatch.setattr(dynal.training, "evaluate", lambda *args, **kw: accuracies.append(evaluate(*args, **kw)) or accuracies[-1])
    model = build_model(model_factory("mlp", (6,), 3, hidden=[16]), np.random.default_rng(0))
    result = fit(model, X, y, TrainConfig(epochs=15, batch_size=8, lr=0.05, val_fraction=0.25), np.random.default_rng(11))
    best = int(np.argmax(accuracies))  # the first epoch with the best hold-out accuracy
    assert best != len(accuracies) - 1  # the case this test is about
    assert result.final_loss == result.history[best]
    plain = build_model(model_factory("mlp", (6,), 3, hidden=[16]), np.random.default_rng(0))
    result = fit(plain, X, y, TrainConfig(epochs=3), np.random.default_rng(0))
    assert result.final_loss == result.history[-1]


def test_a_lone_last_sample_joins_the_previous_batch():  # T12
    X, y = _data(11)
    model = build_model(model_factory("mlp", (6,), 3, hidden=[8]), np.random.default_rng(0))
    sizes = []
    model.register_forward_pre_hook(lambda m, inputs: sizes.append(len(inputs[0])) if m.training else None)
    fit(model, X, y, TrainConfig(epochs=1, batch_size=5), np.random.default_rng(0))
    assert sorted(sizes) == [5, 6]


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("val_fraction", 1.0), ("val_fraction", -0.1)])
def test_train_config_more_ranges(field, value):  # T9, T10
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})
