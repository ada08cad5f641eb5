import copy
import warnings

import numpy as np
import pytest
import threadpoolctl
import torch
from torch.nn import functional as F

from dynal.engine import Context, StreamingTopK, labeled_stats, pool_chunks, tie_keys
from dynal.models import MLP
from dynal.objective import single_gains
from dynal.strategies import DynamicAL


def _autograd_head_grads(model, X, y):
    """Per-sample gradient of the loss w.r.t. the head's weight and bias, one sample at a time."""
    grads = []
    for x, t in zip(torch.from_numpy(X), torch.from_numpy(y)):
        model.zero_grad()
        F.cross_entropy(model(x[None]), t[None]).backward()
        parts = [model.head.weight.grad.flatten()]
        if model.head.bias is not None:
            parts.append(model.head.bias.grad)
        grads.append(torch.cat(parts).double().clone())
    return torch.stack(grads)


def _random_problem(bias=True, seed=0):
    torch.manual_seed(seed)
    model = MLP((5,), 4, hidden=[7])
    if not bias:
        model.head = torch.nn.Linear(7, 4, bias=False)
    model.eval()
    rng = np.random.default_rng(seed)
    X_lab, y_lab = rng.normal(size=(9, 5)).astype(np.float32), rng.integers(0, 4, 9)
    X_pool = rng.normal(size=(13, 5)).astype(np.float32)
    return model, X_lab, y_lab, X_pool


def _engine_scores(model, X_lab, y_lab, X_pool, strategy, chunk_size=4):
    stats = labeled_stats(model, strategy.labeled, X_lab, y_lab, batch_size=4)
    ctx = Context(model, stats, torch.Generator(), strategy.output_options())
    chunks = pool_chunks(model, X_pool, np.arange(len(X_pool)), strategy.outputs, ctx, chunk_size)
    return np.concatenate([strategy.score(c, stats) for c in chunks])


@pytest.mark.parametrize("bias", [True, False])
def test_last_layer_closed_forms_equal_autograd(bias):
    model, X_lab, y_lab, X_pool = _random_problem(bias)
    with torch.no_grad():
        pseudo = model(torch.from_numpy(X_pool)).argmax(1).numpy()
    g_pool = _autograd_head_grads(model, X_pool, pseudo)
    G_S = _autograd_head_grads(model, X_lab, y_lab).sum(0)
    norm_sq = (g_pool**2).sum(1).numpy()
    cross = (g_pool @ G_S).numpy()

    got_norm = _engine_scores(model, X_lab, y_lab, X_pool, DynamicAL(train_term=0.0))
    np.testing.assert_allclose(got_norm, norm_sq, rtol=1e-5)
    got = _engine_scores(model, X_lab, y_lab, X_pool, DynamicAL(train_term=2.0))
    np.testing.assert_allclose(got, norm_sq + 2 * cross, rtol=1e-5, atol=1e-7 * np.abs(cross).max())
    # the score is the exact gain G(S + {u}) - G(S)
    gain = ((G_S + g_pool) ** 2).sum(1) - (G_S**2).sum()
    np.testing.assert_allclose(got, gain.numpy(), rtol=1e-5, atol=1e-6 * float((G_S**2).sum()))
    # params="last" is the head's whole gradient, trainable or not (as documented)
    model.head.requires_grad_(False)
    np.testing.assert_array_equal(_engine_scores(model, X_lab, y_lab, X_pool, DynamicAL(train_term=2.0)), got)


def test_expected_pseudo_label_is_the_expectation_over_p():
    model, X_lab, y_lab, X_pool = _random_problem(seed=3)
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(X_pool)).double(), 1).numpy()
    G_S = _autograd_head_grads(model, X_lab, y_lab).sum(0)
    expected = np.zeros(len(X_pool))
    for k in range(p.shape[1]):
        g = _autograd_head_grads(model, X_pool, np.full(len(X_pool), k))
        expected += p[:, k] * (((g**2).sum(1) + 2 * (g @ G_S)).numpy())
    got = _engine_scores(model, X_lab, y_lab, X_pool, DynamicAL(pseudo_label="expected"))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_pool_chunks_cover_each_row_once_and_respect_rows():
    model, _, _, X_pool = _random_problem()
    ctx = Context(model, {}, torch.Generator())
    rows = np.array([12, 0, 5, 7, 3])
    chunks = list(pool_chunks(model, X_pool, rows + 100, ["probs", "features"], ctx, 2, rows=rows))
    assert [len(c["ids"]) for c in chunks] == [2, 2, 1]
    ids = np.concatenate([c["ids"] for c in chunks])
    np.testing.assert_array_equal(ids, rows + 100)
    probs = np.concatenate([c["probs"] for c in chunks])
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(X_pool[rows])).double(), 1).numpy()
    np.testing.assert_allclose(probs, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown pool outputs"):
        list(pool_chunks(model, X_pool, np.arange(13), ["gradz"], ctx))


def test_pool_chunks_run_numpy_blas_single_threaded_and_restore_it():
    blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    if not blas:
        pytest.skip("numpy has no BLAS thread pool here")
    before = [p["num_threads"] for p in blas]
    model, _, _, X_pool = _random_problem()
    ctx = Context(model, {}, torch.Generator())
    for _ in range(2):  # the thread pools are found once and reused by later passes
        for _ in pool_chunks(model, X_pool, np.arange(len(X_pool)), ["probs"], ctx, 4):
            inside = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
            assert inside == [1] * len(blas)
        after = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert after == before


def _brute_topk(ids, scores, k, salt):
    keys = tie_keys(ids, salt)
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], -int(keys[i])))
    return ids[order[:k]]


@pytest.mark.parametrize("buffer", [1, 20, 8192])  # merges after every chunk, every few, once
@pytest.mark.parametrize("k", [0, 1, 7, 50, 200])
def test_streaming_topk_matches_brute_force_in_any_order(k, buffer):
    rng = np.random.default_rng(k)
    ids = rng.permutation(10_000)[:150].astype(np.int64)
    scores = rng.integers(0, 10, 150).astype(float)  # many ties
    expected = _brute_topk(ids, scores, k, salt=99)
    for trial in range(3):
        perm = rng.permutation(150)
        topk = StreamingTopK(k, salt=99, buffer=buffer)
        for part in np.array_split(perm, 1 + trial * 4):
            topk.push(ids[part], scores[part])
        got, got_scores = topk.result()
        np.testing.assert_array_equal(got, expected)
        assert np.all(np.diff(got_scores) <= 0)


def test_streaming_topk_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        StreamingTopK(2, 0).push(np.arange(3), np.array([0.0, np.nan, 1.0]))
    topk = StreamingTopK(2, salt=0, buffer=1)
    topk.push(np.arange(3), np.array([5.0, 6.0, 7.0]))  # merged: a floor of 6, which NaN is not above
    with pytest.raises(ValueError, match="NaN"):
        topk.push(np.arange(3, 6), np.array([1.0, np.nan, 2.0]))


@pytest.mark.parametrize("buffer", [1, 4])
def test_streaming_topk_has_no_floor_before_it_holds_k(buffer):
    ids, scores = np.arange(1000, 1030), np.linspace(10.0, -10.0, 30)  # the best come first
    topk = StreamingTopK(12, salt=5, buffer=buffer)
    for part in np.array_split(np.arange(30), 6):  # chunks of 5, fewer than k
        topk.push(ids[part], scores[part])
    got, got_scores = topk.result()
    np.testing.assert_array_equal(got, _brute_topk(ids, scores, 12, 5))
    np.testing.assert_array_equal(got_scores, scores[:12])


def test_streaming_topk_memory_stays_bounded_under_ties_and_arrays_can_be_reused():
    topk = StreamingTopK(5, salt=3, buffer=1000)
    ids, scores = np.empty(40, dtype=np.int64), np.zeros(40)
    for start in range(0, 4000, 40):  # every score ties with the floor
        ids[:] = np.arange(start, start + 40)  # the caller refills the same arrays
        topk.push(ids, scores)
        assert len(topk.ids) + topk._n_waiting <= 5 + 1000 + 40
    got, _ = topk.result()
    np.testing.assert_array_equal(got, _brute_topk(np.arange(4000), np.zeros(4000), 5, salt=3))


def test_argmax_tied_breaks_ties_by_key_and_refuses_nan():
    from dynal.engine.topk import argmax_tied

    keys = np.array([5, 9, 1, 7], dtype=np.uint64)
    assert argmax_tied(np.array([1.0, 2.0, 2.0, 2.0]), keys) == 1
    assert argmax_tied(np.array([3.0, 2.0, 2.0, 2.0]), keys) == 0
    with pytest.raises(ValueError, match=r"NaN \(at position 2\)"):
        argmax_tied(np.array([1.0, 2.0, np.nan, 0.0]), keys)


def test_tie_keys_depend_on_salt_not_position():
    ids = np.arange(100)
    a, b = tie_keys(ids, 1), tie_keys(ids[::-1], 1)
    np.testing.assert_array_equal(a, b[::-1])
    assert not np.array_equal(a, tie_keys(ids, 2))
    assert len(np.unique(a)) == 100


def test_last_layer_stats_match_the_float64_closed_form_on_wide_features():
    torch.manual_seed(1)
    model = MLP((20,), 10, hidden=[512]).eval()
    rng = np.random.default_rng(1)
    X_lab, y_lab = rng.normal(size=(50, 20)).astype(np.float32), rng.integers(0, 10, 50)
    X_pool = rng.normal(size=(300, 20)).astype(np.float32)
    stats = labeled_stats(model, ["last_layer_grad_sum"], X_lab, y_lab, batch_size=16)
    ctx = Context(model, stats, torch.Generator())
    chunks = list(pool_chunks(model, X_pool, np.arange(300), ["last_layer_stats", "last_layer_grad"], ctx, chunk_size=64))
    got = np.concatenate([c["grad_norm_sq"] + 2 * c["grad_dot_labeled"] for c in chunks])
    r, h = (np.concatenate([c[k] for c in chunks]) for k in ("r", "h"))
    want = single_gains(r, h, stats["A"], stats["a"], bias=True)  # all in float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def _last_layer_outputs(model, stats, X_pool, outputs=("last_layer_stats",)):
    ctx = Context(model, stats, torch.Generator())
    chunks = list(pool_chunks(model, X_pool, np.arange(len(X_pool)), list(outputs), ctx, chunk_size=16))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def test_last_layer_norm_is_accurate_for_confident_predictions():
    # p_y = 1 - 1e-12: forming r = p - e_y in float64 loses about four digits of ||r||^2
    torch.manual_seed(0)
    model = MLP((6,), 5, hidden=[8]).eval()
    X_pool = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    with torch.no_grad():
        model.head.weight.mul_(100.0)
    got = _last_layer_outputs(model, {}, X_pool)["grad_norm_sq"]
    with torch.no_grad():
        x = torch.from_numpy(X_pool)
        h, z = model.features(x).double(), model(x).double()
    logp = torch.log_softmax(z, 1)
    y = z.argmax(1)
    off = logp.exp().scatter(1, y[:, None], 0.0)  # p_k for k != y, each to float64 precision
    r_sq = off.sum(1) ** 2 + off.pow(2).sum(1)
    want = (r_sq * (h.pow(2).sum(1) + 1)).numpy()
    naive = F.softmax(z, 1) - F.one_hot(y, 5)  # the case this test is about occurs
    assert not np.allclose(naive.pow(2).sum(1).numpy(), r_sq.numpy(), rtol=1e-5, atol=0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_last_layer_stats_same_with_a_hooked_head_and_share_the_logits():
    model, X_lab, y_lab, X_pool = _random_problem(seed=3)
    stats = labeled_stats(model, ["last_layer_grad_sum"], X_lab, y_lab, batch_size=4)
    called = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: called.append(m))
    try:
        fused = _last_layer_outputs(model, stats, X_pool, ("last_layer_stats", "probs"))
    finally:
        handle.remove()
    assert model.head not in called and model.body in called  # the product with [W; A] served as the head
    with torch.no_grad():
        want_probs = F.softmax(model(torch.from_numpy(X_pool)).double(), 1).numpy()
    np.testing.assert_allclose(fused["probs"], want_probs, rtol=1e-6)
    calls = []
    handle = model.head.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    try:  # a hooked head is called as a module, so the product with [W; A] is not taken
        plain = _last_layer_outputs(model, stats, X_pool, ("last_layer_stats", "probs"))
    finally:
        handle.remove()
    assert sum(calls) == len(X_pool)
    for key in ("grad_norm_sq", "grad_dot_labeled", "probs"):
        np.testing.assert_allclose(plain[key], fused[key], rtol=1e-5, atol=1e-7)


class CosineHead(torch.nn.Linear):
    """A Linear subclass with its own forward: logits from normalized features and weights."""

    def forward(self, h):
        return 10 * F.linear(F.normalize(h, dim=1), F.normalize(self.weight, dim=1), self.bias)


class LoggingHead(torch.nn.Linear):
    """A Linear subclass whose forward records calls and computes W h + b."""

    def forward(self, h):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(h)


@pytest.mark.parametrize("output", ["last_layer_stats", "last_layer_grad", "head_features"])
def test_last_layer_outputs_refuse_a_head_that_is_not_linear(output):
    model, X_lab, y_lab, X_pool = _random_problem(seed=4)
    stats = labeled_stats(model, ["last_layer_grad_sum"], X_lab, y_lab, batch_size=4)
    want = _last_layer_outputs(model, stats, X_pool, [output])
    handle = model.head.register_forward_hook(lambda m, i, o: o * 2)
    try:
        with pytest.raises(ValueError, match=r"model.head \(Linear\) computes something else.*params='all'"):
            _last_layer_outputs(model, stats, X_pool, [output])
        with pytest.raises(ValueError, match="computes something else"):
            labeled_stats(model, ["last_layer_grad_sum"], X_lab, y_lab, batch_size=4)
    finally:
        handle.remove()
    head = model.head
    model.head = CosineHead(head.in_features, head.out_features)
    with pytest.raises(ValueError, match=r"model.head \(CosineHead\) computes something else"):
        _last_layer_outputs(model, stats, X_pool, [output])
    model.head = LoggingHead(head.in_features, head.out_features)  # W h + b: accepted, same values
    model.head.load_state_dict(head.state_dict())
    got = _last_layer_outputs(model, stats, X_pool, [output])
    assert model.head.calls >= 1
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7)


def test_the_engine_gives_each_module_its_mode_back():
    model, X_lab, y_lab, X_pool = _random_problem(seed=5)
    model.train()
    model.body[1].eval()  # a model mixing modes keeps the mix
    modes = [m.training for m in model.modules()]
    for strategy in (DynamicAL(), DynamicAL(params="all")):
        _engine_scores(model, X_lab, y_lab, X_pool, strategy)
        assert [m.training for m in model.modules()] == modes


def test_labeled_statistics_must_be_finite_and_residuals_do_not_cancel():
    from dynal.engine import residuals

    model, X_lab, y_lab, _ = _random_problem(seed=6)
    X_lab[2, 1] = np.nan
    with pytest.raises(ValueError, match="labeled-set statistic 'A' contains NaN"):
        labeled_stats(model, ["last_layer_grad_sum"], X_lab, y_lab)
    p = torch.softmax(torch.tensor([[0.0, -40.0, -45.0]], dtype=torch.float64), 1)
    r = residuals(p, torch.tensor([0]))
    assert p[0, 0] == 1.0  # p - e_y would give r_y = 0 exactly
    assert r[0, 0] == -(p[0, 1] + p[0, 2]) and r[0, 0] < 0
    assert torch.equal(r[0, 1:], p[0, 1:])


def _count_forwards(model, grad_mode=False):
    """The samples of each pass of ``model`` (with ``grad_mode``, also whether autograd records it)."""
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append((len(args[0]), torch.is_grad_enabled()) if grad_mode else len(args[0])))
    return calls


def test_forward_batch_keeps_the_largest_layer_output_near_the_cache_size():
    from dynal.engine.modes import _ACTIVATION_BYTES, forward_batch
    from dynal.models import SmallCNN

    model = SmallCNN((1, 16, 16), 3, width=8, hidden=8).eval()  # largest output: 8 x 16 x 16 floats
    assert forward_batch(model, torch.randn(5, 1, 16, 16)) == _ACTIVATION_BYTES // (8 * 16 * 16 * 4)
    assert forward_batch(model, torch.randn(0, 1, 16, 16)) == 1
    model.body[1] = torch.nn.BatchNorm2d(8, track_running_stats=False).eval()  # depends on its batch
    assert forward_batch(model, torch.randn(5, 1, 16, 16)) == 5


@pytest.mark.parametrize("outputs", [["probs", "features"], ["last_layer_stats"], ["mc_probs"]])
def test_pool_scan_in_cache_sized_forward_passes_gives_the_same_outputs(monkeypatch, outputs):
    from dynal.models import SmallCNN

    torch.manual_seed(3)
    model = SmallCNN((1, 8, 8), 3, width=4, hidden=8, dropout=0.3).eval()
    rng = np.random.default_rng(3)
    X_lab, y_lab, X_pool = rng.normal(size=(6, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 6), rng.normal(size=(11, 1, 8, 8)).astype(np.float32)
    stats = labeled_stats(model, ["last_layer_grad_sum", "labeled_outputs"], X_lab, y_lab, batch_size=4)

    def scan():
        ctx = Context(model, stats, torch.Generator().manual_seed(0), {"mc_probs": {"passes": 3}})
        chunks = list(pool_chunks(model, X_pool, np.arange(11), outputs, ctx, chunk_size=8))
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}, ctx

    whole, _ = scan()
    monkeypatch.setattr("dynal.engine.modes._ACTIVATION_BYTES", 3 * 4 * 8 * 8 * 4)  # 3 samples per pass
    calls = _count_forwards(model.body)
    parts, ctx = scan()
    assert ctx.cache["forward_batch"] == 3 and max(calls) == 3 and sum(calls) == 2 + 11 * (3 if outputs == ["mc_probs"] else 1)
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-5, atol=1e-7)
    split_stats = labeled_stats(model, ["last_layer_grad_sum", "labeled_outputs"], X_lab, y_lab, batch_size=4)
    for k in ("A", "a", "labeled_features", "labeled_probs"):
        np.testing.assert_allclose(split_stats[k], stats[k], rtol=1e-5, atol=1e-7)


class _Awkward(torch.nn.Module):
    """Models the one-sample measurement must not break: a TorchScript part, features that a
    forward reshapes into, features that need more than one sample, tuple features."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        if kind == "script":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script in torch 2.13
                self.conv = torch.jit.script(torch.nn.Sequential(self.conv, torch.nn.ReLU()))
        self.norm = torch.nn.BatchNorm1d(3)
        self.head = _PairHead() if kind == "tuple" else torch.nn.Linear(3, 2)

    def features(self, x):
        if self.kind == "flat":  # expects the forward's (N, 1, 4, 4) view
            x = x.view(-1, 1, 4, 4)
        h = self.conv(x).mean((2, 3))
        if self.kind == "squeeze":  # (N, 3, 1, 1) -> (N, 3) only for N > 1
            h = self.norm(self.conv(x).amax((2, 3), keepdim=True).squeeze())
        return (h, 2 * h) if self.kind == "tuple" else h

    def forward(self, x):
        return self.head(self.features(x.flatten(1) if self.kind == "flat" else x))


class _PairHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, pair):
        return self.fc(pair[0] + pair[1])


@pytest.mark.parametrize("kind", ["script", "flat", "squeeze", "tuple"])
def test_forward_passes_in_parts_work_for_any_model_and_leave_no_hooks(monkeypatch, kind):
    from dynal.training import predict_proba

    torch.manual_seed(10)
    model = _Awkward(kind).eval()
    X = np.random.default_rng(10).normal(size=(10, 1, 4, 4)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(X)), 1).double().numpy()
    monkeypatch.setattr("dynal.engine.modes._ACTIVATION_BYTES", 400)  # 2 samples per pass
    ctx = Context(model, {}, torch.Generator())
    probs = np.concatenate([c["probs"] for c in pool_chunks(model, X, np.arange(10), ["probs"], ctx, 4)])
    assert ctx.cache["forward_batch"] == (6 if kind == "script" else 2)  # TorchScript layers are not measured
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    np.testing.assert_allclose(predict_proba(model, X), expected, rtol=1e-5)
    assert all(not m._forward_hooks for m in model.modules() if not isinstance(m, torch.jit.ScriptModule))


def test_a_scan_that_needs_no_features_measures_only_the_gradient_pass():
    from dynal.models import SmallCNN

    model = SmallCNN((1, 6, 6), 3, width=4, hidden=8).eval()
    calls = _count_forwards(model.body, grad_mode=True)
    ctx = Context(model, {}, torch.Generator())
    X = np.random.default_rng(4).normal(size=(5, 1, 6, 6)).astype(np.float32)
    list(pool_chunks(model, X, np.arange(5), ["param_grad_stats"], ctx, 4))
    # no features measured; the gradient statistics measure their own passes once per query
    # (without autograd, on two samples) and probe the sample axes once (with it)
    assert "forward_batch" not in ctx.cache and calls.count((2, False)) == 1 and calls.count((2, True)) == 1
    assert ctx.cache["param_grad_stats"].forward_batch > 5
    # with the labeled-set gradient G_S, its measurement serves the pool's passes too
    strategy, calls[:] = DynamicAL(params="all"), []
    stats = labeled_stats(model, strategy.labeled, X[:3], np.array([0, 1, 2]))
    assert calls.count((2, False)) == 1  # the labeled set's measurement
    ctx = Context(model, stats, torch.Generator(), strategy.output_options())
    list(pool_chunks(model, X, np.arange(5), strategy.outputs, ctx, 4))
    assert calls.count((2, False)) == 1 and ctx.cache["param_grad_stats"].forward_batch == stats["forward_batch"]


class _Margin(torch.nn.Module):
    """Features = the input; two classes with logits (h, 0): the margin is h."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [0.0]]))

    def features(self, x):
        return x

    def forward(self, x):
        return self.head(x)


def test_expected_gradient_scores_keep_their_precision_for_confident_samples():
    # with p = (1 - t, t), t = e^-m / (1 + e^-m): E||g||^2 = 2 t (1 - t) m^2 and EGL's
    # E||g|| = 2 sqrt(2) t (1 - t) m; forming 1 - ||p||^2 or 1 - p_y lost every digit past m = 36
    from dynal.strategies.embedding import EGL

    model = _Margin().double().eval()
    margins = np.array([5.0, 20.0, 40.0, 60.0, 300.0])
    t = np.exp(-margins) / (1 + np.exp(-margins))
    for strategy, want in ((DynamicAL(pseudo_label="expected"), 2 * t * (1 - t) * margins**2), (EGL(), 2 * np.sqrt(2) * t * (1 - t) * margins)):
        got = _engine_scores(model, np.zeros((0, 1)), np.zeros(0, dtype=int), margins[:, None], strategy)
        np.testing.assert_allclose(got, want, rtol=1e-12)


class _Linear(torch.nn.Module):
    """Features = the input, a linear head without bias."""

    def __init__(self, d, K):
        super().__init__()
        self.head = torch.nn.Linear(d, K, bias=False)

    def features(self, x):
        return x

    def forward(self, x):
        return self.head(x)


@pytest.mark.parametrize("hooked", [False, True])
def test_the_cross_term_keeps_a_labeled_sum_below_float32s_range(hooked):
    # a labeled set the model is sure of to logit margins over 110: the entries of A (about
    # 1e-50) are zero in float32, yet the cross term of pool samples as sure as those is larger
    # than their norm; the float64 copy of the model keeps A in float64 throughout
    torch.manual_seed(0)
    model = _Linear(2, 3).eval()
    with torch.no_grad():
        model.head.weight.mul_(50.0)
    rng = np.random.default_rng(0)
    X_pool, X_lab = (rng.normal(size=(2, 40, 2)) * 3).astype(np.float32)
    with torch.no_grad():
        z = model(torch.from_numpy(X_lab)).sort(1).values
    X_lab = X_lab[(z[:, -1] - z[:, -2] > 110).numpy()]
    with torch.no_grad():
        y_lab = model(torch.from_numpy(X_lab)).argmax(1).numpy()
    stats = labeled_stats(model, ["last_layer_grad_sum"], X_lab, y_lab, batch_size=8)
    assert len(X_lab) >= 5 and np.abs(stats["A"]).max() > 0 and not stats["A"].astype(np.float32).any()
    if hooked:  # not the product with [W; A]
        model.head.register_forward_hook(lambda m, args, out: out)
    got = _last_layer_outputs(model, stats, X_pool)
    double = copy.deepcopy(model).double()
    stats64 = labeled_stats(double, ["last_layer_grad_sum"], X_lab.astype(np.float64), y_lab, batch_size=8)
    want = _last_layer_outputs(double, stats64, X_pool.astype(np.float64))
    assert (np.abs(want["grad_dot_labeled"]) > want["grad_norm_sq"]).any()  # the case this test is about
    np.testing.assert_allclose(got["grad_dot_labeled"], want["grad_dot_labeled"], rtol=1e-3)
    np.testing.assert_allclose(got["grad_norm_sq"], want["grad_norm_sq"], rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_take_the_last_layer_path(dtype):
    # bfloat16 features (which numpy lacks) and float16 labeled sums A h (which overflow float16
    # on a large labeled set) give the float32 model's scores to their rounding
    from dynal.strategies.embedding import EGL

    model, _, _, X_pool = _random_problem(seed=5)
    rng = np.random.default_rng(5)
    X_lab, y_lab = rng.normal(size=(6000, 5)).astype(np.float32) * 3, rng.integers(0, 4, 6000)
    half = MLP((5,), 4, hidden=[7]).to(dtype).eval()
    half.load_state_dict(model.state_dict())
    features = half.features
    half.features = lambda x: features(x.to(dtype))
    for strategy in (DynamicAL(), DynamicAL(pseudo_label="expected"), EGL()):
        want = _engine_scores(model, X_lab, y_lab, X_pool, strategy)
        got = _engine_scores(half, X_lab, y_lab, X_pool, strategy)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=0.1, atol=0.05 * np.abs(want).max())


class _BareHead(torch.nn.Module):
    """A head of its own computing W h, with neither bias nor in/out_features."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, h):
        return h @ self.weight.T


def test_a_head_of_its_own_computing_w_h_takes_the_last_layer_path():
    model, X_lab, y_lab, X_pool = _random_problem(bias=False, seed=6)
    want = _engine_scores(model, X_lab, y_lab, X_pool, DynamicAL())
    model.head = _BareHead(model.head.weight.detach())
    np.testing.assert_allclose(_engine_scores(model, X_lab, y_lab, X_pool, DynamicAL()), want, rtol=1e-5, atol=1e-6)


def test_pool_rows_must_be_positions():
    model, _, _, X_pool = _random_problem(seed=7)
    ctx = Context(model, {}, torch.Generator())
    with pytest.raises(ValueError, match="rows must be integer positions"):
        list(pool_chunks(model, X_pool, np.arange(3), ["probs"], ctx, rows=np.arange(len(X_pool)) < 3))


def test_dynamical_rejects_bad_options_by_name():
    for kwargs, message in [
        ({"params": "first"}, "params must be 'last' or 'all', got 'first'"),
        ({"pseudo_label": "max"}, "pseudo_label"),
        ({"train_term": "2"}, "train_term must be a finite number >= 0, got '2'"),
        ({"train_term": -1.0}, "train_term"),
        ({"train_term": float("nan")}, "train_term"),
        ({"train_term": True}, "train_term"),
    ]:
        with pytest.raises(ValueError, match=message):
            DynamicAL(**kwargs)


def test_expected_last_layer_stats_have_no_cross_term_even_with_the_labeled_sums():
    """``E[p - e_y] = 0``: with ``pseudo_label="expected"`` the cross term is zero whether or
    not the labeled sums were computed (the strategy does not ask for them)."""
    torch.manual_seed(0)
    model = MLP((5,), 4, hidden=[7]).eval()
    rng = np.random.default_rng(0)
    X_lab, y_lab = rng.normal(size=(9, 5)).astype(np.float32), rng.integers(0, 4, 9)
    X_pool = rng.normal(size=(13, 5)).astype(np.float32)
    options = {"last_layer_stats": {"pseudo_label": "expected"}}
    outs = []
    for labeled in (("last_layer_grad_sum",), ()):
        stats = labeled_stats(model, labeled, X_lab, y_lab, batch_size=4)
        chunks = list(pool_chunks(model, X_pool, np.arange(13), ("last_layer_stats",), Context(model, stats, torch.Generator(), options), 4))
        outs.append([np.concatenate([c[k] for c in chunks]) for k in ("grad_norm_sq", "grad_dot_labeled")])
    np.testing.assert_array_equal(outs[0][1], 0.0)
    np.testing.assert_allclose(outs[0][0], outs[1][0])


class _Confident(torch.nn.Module):
    """Features = the input; logits (0, -g, -2g): probabilities far below float32's range."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(1, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0], [-1.0], [-2.0]]))
            self.head.bias.zero_()

    def features(self, x):
        return x


def test_pool_probs_are_the_float64_softmax_of_the_logits():
    from dynal.strategies import LeastConfidence

    model = _Confident().eval()
    gaps = np.array([[60.0], [80.0], [100.0], [120.0]], dtype=np.float32)
    ctx = Context(model, {}, torch.Generator().manual_seed(0))
    probs = np.concatenate([c["probs"] for c in pool_chunks(model, gaps, np.arange(4), ["probs"], ctx, 4)])
    z = np.concatenate([np.zeros((4, 1)), -gaps.astype(np.float64), -2 * gaps.astype(np.float64)], axis=1)
    np.testing.assert_allclose(probs, np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-12, atol=0)
    assert np.all(np.diff(LeastConfidence().score({"probs": probs}, {})) < 0)  # still ordered
