"""BALD, Coreset, BADGE, EGL and BAIT against slow references written from their definitions."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import chisquare
from torch import nn
from torch.nn import functional as F

from dynal import ActiveLearner, Split, TrainConfig, model_factory
from dynal.engine import Context, labeled_stats, pool_chunks, tie_keys
from dynal.engine.topk import draw_salt
from dynal.strategies import BADGE, BAIT, BALD, EGL, Coreset, Entropy, LeastConfidence, Margin, RandomSampling, make_strategy
from dynal.strategies.bayesian import mutual_information
from dynal.strategies.collect import gather
from dynal.strategies.embedding import badge_sq_dists


def _chunks(ids, size=7, **arrays):
    """The pool pass as the engine yields it: dicts of ``ids`` and per-sample arrays."""
    return [{"ids": ids[i : i + size], **{k: v[i : i + size] for k, v in arrays.items()}} for i in range(0, len(ids), size)]


def _softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _pool(n, k, d, seed):
    """Random ids (not positions), probabilities and features."""
    g = np.random.default_rng(seed)
    ids = g.choice(10_000, size=n, replace=False).astype(np.int64)
    return ids, _softmax(2 * g.normal(size=(n, k))), g.normal(size=(n, d))


# ----------------------------------------------------------------------------- BALD
def _mi_reference(P):
    out = []
    for sample in P:  # T x K
        T, K = sample.shape
        mean = [sum(sample[t][k] for t in range(T)) / T for k in range(K)]
        h_mean = -sum(m * math.log(m) for m in mean if m > 0)
        h_each = sum(-sum(q * math.log(q) for q in row if q > 0) for row in sample) / T
        out.append(h_mean - h_each)
    return np.array(out)


def test_bald_mutual_information_matches_brute_force_even_with_zero_probabilities():
    g = np.random.default_rng(0)
    P = _softmax(g.normal(size=(40, 3))).reshape(8, 5, 3)
    P[0] = [1.0, 0.0, 0.0]  # certain in every pass: no information
    P[1, :, :] = 0.0
    P[1, :, 0], P[1, 2:, 0], P[1, 2:, 1] = 1.0, 0.0, 1.0  # certain but disagreeing passes
    mi = mutual_information(P)
    np.testing.assert_allclose(mi, _mi_reference(P), atol=1e-12)
    assert mi[0] == 0.0 and mi[1] == pytest.approx(-(0.4 * math.log(0.4) + 0.6 * math.log(0.6)))
    np.testing.assert_allclose(BALD(passes=5).score({"mc_probs": P}, {}), mi)


@pytest.fixture(scope="module")
def cnn_learner():
    """A fitted learner over tiny images with a BatchNorm CNN that has dropout."""
    g = np.random.default_rng(0)
    pool = Split(np.arange(100, 160), g.normal(size=(60, 1, 8, 8)).astype(np.float32), g.integers(0, 3, 60))
    factory = model_factory("cnn", (1, 8, 8), 3, width=4, hidden=8, dropout=0.4)
    learner = ActiveLearner(pool, factory, BALD(passes=6), 3, TrainConfig(epochs=2, batch_size=8), rng=0, chunk_size=16)
    learner.initialize(pool.ids[:10])
    learner.fit()
    return learner


def test_bald_leaves_batchnorm_and_global_rng_untouched(cnn_learner):
    learner = cnn_learner
    model = learner.model
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.train()  # a trainer may leave it so; the query must not update the statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    q = learner.query(5)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    assert all(not m._forward_hooks for m in model.modules())
    assert len(q.ids) == 5 and (q.scores >= 0).all()


def _mc_pass(model, X, ids, chunk_size, passes=8, seed=5):
    ctx = Context(model, {}, torch.Generator().manual_seed(seed), {"mc_probs": {"passes": passes}})
    out = {}
    for c in pool_chunks(model, X, ids, ["mc_probs"], ctx, chunk_size):
        out.update(zip(c["ids"].tolist(), c["mc_probs"]))
    return out


def test_mc_probs_depend_on_the_sample_not_its_chunk_and_passes_differ(cnn_learner):
    learner = cnn_learner
    X, ids = learner.pool.X, learner.pool.ids
    a = _mc_pass(learner.model, X, ids, chunk_size=16)
    perm = np.random.default_rng(2).permutation(len(ids))
    b = _mc_pass(learner.model, X[perm], ids[perm], chunk_size=7)
    for i in ids.tolist():
        np.testing.assert_allclose(a[i], b[i], rtol=1e-5, atol=1e-7)
        assert a[i].shape == (8, 3)
    assert np.ptp(np.stack(list(a.values())), axis=1).max() > 1e-3  # the passes are stochastic


class _DropoutProbe(nn.Module):
    """``features = flatten(dropout(x))`` with an identity head: the logits show the masks."""

    def __init__(self, d, p, layer=nn.Dropout):
        super().__init__()
        self.drop = layer(p)
        self.head = nn.Linear(d, d)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(d))
            self.head.bias.zero_()

    def features(self, x):
        return self.drop(x).flatten(1)


def _kept(probs, p):
    """Which units each pass kept, from the probe's log-probabilities (dropped units: logit 0)."""
    logp = np.log(probs)  # passes x units; log-softmax = logits - logsumexp
    return logp - logp.min(1, keepdims=True) > 0.5 / (1 - p)


def test_mc_dropout_rate_scaling_and_masks_shared_across_samples():
    d, p, T = 300, 0.3, 10
    probs = _mc_pass(_DropoutProbe(d, p), np.ones((4, d), np.float32), np.arange(4), 3, passes=T)
    logp = np.log(probs[0])  # T x d; log-softmax = logits - logsumexp
    logits = logp - logp.min(1, keepdims=True)  # dropped units have logit 0
    kept = logits > 0.5 / (1 - p)
    np.testing.assert_allclose(logits[kept], 1 / (1 - p), rtol=1e-5)
    assert abs(kept.mean() - (1 - p)) < 0.03
    assert all((kept[s] != kept[t]).any() for s in range(T) for t in range(s))  # each pass a new draw
    for i in range(1, 4):  # identical inputs: one posterior draw per pass for every sample
        np.testing.assert_allclose(probs[i], probs[0])


def test_mc_dropout2d_drops_whole_channels():
    c, p = 40, 0.3
    probs = _mc_pass(_DropoutProbe(c * 4, p, nn.Dropout2d), np.ones((3, c, 2, 2), np.float32), np.arange(3), 2, passes=6)
    kept = _kept(probs[0], p).reshape(6, c, 4)
    assert (kept == kept[:, :, :1]).all() and kept.any() and not kept.all()  # whole channels


def test_bald_without_dropout_is_a_clear_error(blobs, mlp_factory):
    learner = ActiveLearner(blobs.train, mlp_factory, "bald", blobs.n_classes, TrainConfig(epochs=1), rng=0)
    learner.initialize(10)
    with pytest.raises(ValueError, match="dropout"):  # found when the model is built, not at the query
        learner.fit()
    assert learner.model is None


@pytest.mark.parametrize("passes", [1, 2.5, True])
def test_bald_bad_passes(passes):
    with pytest.raises(ValueError, match="passes"):
        BALD(passes=passes)


# ----------------------------------------------------------------------------- Coreset
def _coreset_reference(X, L, budget, first=None):
    """k-center greedy on the full (N + L) x (N + L) distance matrix."""
    D = cdist(np.vstack([X, L]), np.vstack([X, L]))
    centres = list(range(len(X), len(X) + len(L)))
    picks, scores = [], []
    for _ in range(budget):
        dist = D[: len(X), centres].min(1) if centres else np.full(len(X), np.inf)
        dist[picks] = -1
        i = int(np.argmax(dist)) if first is None or picks else first
        picks.append(i)
        scores.append(dist[i])
        centres.append(i)
    return picks, scores


@pytest.mark.parametrize("n_labeled", [0, 6])
def test_coreset_matches_full_distance_matrix_greedy(n_labeled):
    ids, _, X = _pool(50, 2, 4, seed=1)
    X = X.astype(np.float32)
    L = np.random.default_rng(2).normal(size=(n_labeled, 4)).astype(np.float32)
    first = int(np.argmax(tie_keys(ids, draw_salt(np.random.default_rng(3))))) if n_labeled == 0 else None
    picks, scores = _coreset_reference(X, L, 12, first)
    got, got_scores = Coreset().select(_chunks(ids, features=X), {"labeled_features": L}, 12, np.random.default_rng(3))
    np.testing.assert_array_equal(got, ids[picks])
    skip = 1 if n_labeled == 0 else 0  # without centres the first pick's distance is inf
    np.testing.assert_allclose(got_scores[skip:], scores[skip:], rtol=1e-7)


def test_coreset_is_exact_on_features_with_a_large_common_offset():
    ids, _, X = _pool(40, 2, 4, seed=4)
    X = 100.0 + 3e-4 * X  # the expanded ||a||² + ||b||² - 2 a·b alone would round to noise
    L = 100.0 + 3e-4 * np.random.default_rng(5).normal(size=(3, 4))
    picks, scores = _coreset_reference(X, L, 9)
    got, got_scores = Coreset().select(_chunks(ids, features=X), {"labeled_features": L}, 9, np.random.default_rng(0))
    np.testing.assert_array_equal(got, ids[picks])
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6)


def test_coreset_never_repeats_when_features_coincide():
    ids = np.arange(200, 230)
    X = np.repeat(np.eye(3), 10, axis=0)  # three distinct points, ten copies each
    got, _ = Coreset().select(_chunks(ids, features=X), {"labeled_features": np.zeros((1, 3))}, 25, np.random.default_rng(0))
    assert len(set(got.tolist())) == 25
    assert {int(i) // 10 for i in got[:3] - 200} == {0, 1, 2}


def test_coreset_picks_among_repeated_rows_do_not_depend_on_the_pool_order():
    # a matrix product rounds a row by its place in the matrix: copies of one feature row must
    # still tie exactly, so that the tie keys, not the order, choose among them
    for trial in range(20):
        g = np.random.default_rng(trial)
        n = int(g.integers(20, 200))
        X = g.normal(size=(n // 4, 8))[g.integers(0, n // 4, n)]
        ids, perm = g.permutation(10_000)[:n], g.permutation(n)
        stats = {"labeled_features": np.zeros((0, 8))}
        a, _ = Coreset().select(_chunks(ids, features=X), stats, n, np.random.default_rng(0))
        b, _ = Coreset().select(_chunks(ids[perm], features=X[perm]), stats, n, np.random.default_rng(0))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("collide", [False, True])
def test_distinct_rows_groups_bitwise_equal_rows(collide, monkeypatch):
    from dynal.strategies.collect import distinct_rows

    g = np.random.default_rng(3)
    X = g.normal(size=(6, 5))[g.integers(0, 6, 200)]
    X[7, 2] = np.nextafter(X[7, 2], np.inf)  # one bit away from its copies: a row of its own
    if collide:  # every row gets the same hash: the rows themselves are sorted instead
        unique = np.unique
        monkeypatch.setattr(np, "unique", lambda a, *args, **kw: unique(np.zeros_like(a) if a.dtype == np.uint64 else a, *args, **kw))
    U, row = distinct_rows(X)
    np.testing.assert_array_equal(U[row], X)
    assert len(U) == len({r.tobytes() for r in X}) == 7


def test_coreset_copies_score_exactly_zero_and_follow_the_tie_keys():
    """Copies of a picked point are at distance 0 exactly (no rounding noise), so they come in
    the tie keys' order, as in a greedy on the exact full distance matrix."""
    g = np.random.default_rng(0)
    base = 5.0 + 3.0 * g.normal(size=(4, 6))
    which = np.repeat(np.arange(4), 5)
    ids = g.permutation(np.arange(500, 520))
    X, L = base[which], base[:1]
    keys = tie_keys(ids, draw_salt(np.random.default_rng(0)))
    D, dist = cdist(base, base)[which][:, which], cdist(base, L).min(1)[which]
    picks = []
    for _ in range(20):
        d = dist.copy()
        d[picks] = -1
        top = np.flatnonzero(d == d.max())
        picks.append(int(top[np.argmax(keys[top])]))
        dist = np.minimum(dist, D[picks[-1]])
    got, scores = Coreset().select(_chunks(ids, features=X), {"labeled_features": L}, 20, np.random.default_rng(0))
    np.testing.assert_array_equal(got, ids[picks])
    assert (scores[3:] == 0.0).all()


# ----------------------------------------------------------------------------- BADGE
def _badge_pool(n, k, d, seed):
    ids, p, h = _pool(n, k, d, seed)
    r = p.copy()
    r[np.arange(n), p.argmax(1)] -= 1.0
    return ids, r, h, (r[:, :, None] * h[:, None, :]).reshape(n, k * d)  # the materialized embedding


def test_badge_distances_and_first_centre_match_materialized_embeddings():
    ids, r, h, G = _badge_pool(40, 4, 5, seed=4)
    G2 = (G**2).sum(1)
    for i in (0, 7, 39):
        np.testing.assert_allclose(badge_sq_dists(r, h, G2, i), ((G - G[i]) ** 2).sum(1), rtol=1e-9, atol=1e-12)
        assert badge_sq_dists(r, h, G2, i)[i] == 0.0
    got, scores = BADGE().select(_chunks(ids, r=r, h=h), {}, 1, np.random.default_rng(0))
    assert got[0] == ids[np.argmax(G2)] and scores[0] == pytest.approx(G2.max())


def test_badge_samples_proportionally_to_d2():
    """Empirical (2nd, 3rd) picks against the exact k-means++ law from materialized embeddings."""
    ids, r, h, G = _badge_pool(6, 3, 2, seed=5)
    D = ((G[:, None] - G[None]) ** 2).sum(-1)
    first = int(np.argmax((G**2).sum(1)))
    law = {}
    for j in range(6):
        for k in range(6):
            if len({first, j, k}) == 3:
                w1 = D[first].copy()
                w2 = np.minimum(D[first], D[j])
                w2[[first, j]] = 0
                law[(ids[j], ids[k])] = w1[j] / w1.sum() * w2[k] / w2.sum()
    runs = 4000
    counts = dict.fromkeys(law, 0)
    for seed in range(runs):
        got, _ = BADGE().select(_chunks(ids, size=4, r=r, h=h), {}, 3, np.random.default_rng(seed))
        assert got[0] == ids[first]
        counts[(got[1], got[2])] += 1
    keys = [k for k in law if law[k] * runs >= 5]
    rare = [k for k in law if k not in keys]  # pooled into one cell, if there are any
    observed = np.array([counts[k] for k in keys] + ([sum(counts[k] for k in rare)] if rare else []))
    expected = np.array([law[k] for k in keys] + ([sum(law[k] for k in rare)] if rare else [])) * runs
    assert observed.sum() == runs
    assert chisquare(observed, expected).pvalue > 1e-3


def test_badge_never_returns_duplicates_when_embeddings_coincide():
    g = np.random.default_rng(6)
    base_r = np.array([[0.3, -0.3], [-0.4, 0.4], [0.0, 0.0]])  # the last is a zero embedding
    base_h = g.normal(size=(3, 4))
    which = np.repeat([0, 1, 2], [20, 20, 10])
    ids = g.permutation(np.arange(1000, 1050))
    r, h = base_r[which], base_h[which]
    for seed in range(20):
        got, scores = BADGE().select(_chunks(ids, r=r, h=h), {}, 30, np.random.default_rng(seed))
        assert len(set(got.tolist())) == 30
        pos = {int(i): n for n, i in enumerate(ids)}
        assert {which[pos[int(i)]] for i in got[:3]} == {0, 1, 2}  # copies of a centre get no mass
        assert (scores[3:] == 0).all()


def test_badge_with_all_zero_embeddings_draws_uniformly_and_distinctly():
    ids = np.arange(20)
    got, scores = BADGE().select(_chunks(ids, r=np.zeros((20, 3)), h=np.ones((20, 2))), {}, 20, np.random.default_rng(0))
    assert sorted(got.tolist()) == list(range(20)) and (scores == 0).all()


def test_badge_scores_are_squared_distances_to_the_nearest_earlier_pick():
    ids, p, h = _pool(30, 3, 4, seed=3)
    r = p.copy()
    r[np.arange(30), p.argmax(1)] -= 1.0
    G = (r[:, :, None] * h[:, None, :]).reshape(30, -1)  # materialized gradient embeddings
    got, scores = BADGE().select(_chunks(ids, r=r, h=h), {}, 10, np.random.default_rng(7))
    pos = [int(np.flatnonzero(ids == i)[0]) for i in got]
    for t in range(1, 10):
        assert scores[t] == pytest.approx(min(((G[pos[t]] - G[pos[s]]) ** 2).sum() for s in range(t)), rel=1e-9, abs=1e-12)


def test_badge_draws_in_tie_key_order_once_no_mass_is_left():
    ids = np.arange(40, 60)
    r, h = np.zeros((20, 3)), np.ones((20, 2))  # every embedding zero: no D^2 mass
    keys = tie_keys(ids, draw_salt(np.random.default_rng(0)))
    expected = ids[np.argsort(-keys.astype(np.float64), kind="stable")[:8]]
    for order in (np.arange(20), np.random.default_rng(1).permutation(20)):
        got, _ = BADGE().select(_chunks(ids[order], r=r[order], h=h[order]), {}, 8, np.random.default_rng(0))
        np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------- EGL
@pytest.mark.parametrize("bias", [True, False])
def test_egl_matches_autograd_expected_gradient_length(bias):
    torch.manual_seed(0)
    head = nn.Linear(5, 4, bias=bias).double()
    h = torch.randn(12, 5, dtype=torch.float64)
    p = F.softmax(head(h), 1).detach()
    expected = []
    for x, px in zip(h, p):
        total = 0.0
        for k in range(4):
            grads = torch.autograd.grad(F.cross_entropy(head(x[None]), torch.tensor([k])), list(head.parameters()))
            total += px[k].item() * math.sqrt(sum((g**2).sum().item() for g in grads))
        expected.append(total)
    got = EGL().score({"probs": p.numpy(), "features": h.numpy().astype(np.float32)}, {"head_bias": bias})
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_egl_keeps_its_precision_past_the_squares_float64_can_hold():
    # two classes, logits (m, 0): p = (1 - t, t) with t = e^-m / (1 + e^-m); the gradients at
    # the two classes have lengths sqrt(2) t and sqrt(2) (1 - t) (times ||(h, 1)||), so
    # E||g|| = 2 sqrt(2) t (1 - t) ||(h, 1)||; t^2 underflows float64 past a margin of about 354
    margins = np.array([30.0, 360.0, 372.0, 600.0])
    t = np.exp(-margins) / (1 + np.exp(-margins))
    p = np.stack([1 - t, t], axis=1)
    h = np.array([[1.0], [2.0], [3.0], [1.0]])
    got = EGL().score({"probs": p, "features": h}, {"head_bias": True})
    np.testing.assert_allclose(got, 2 * np.sqrt(2) * t * (1 - t) * np.sqrt(h[:, 0] ** 2 + 1), rtol=1e-12)


# ----------------------------------------------------------------------------- BAIT
def _bait_reference(p, h, pL, hL, budget, oversample, reg, diagonal):
    """BAIT from its definition: materialized D x D Fisher matrices, an inverse per candidate."""
    info = [np.kron(np.diag(q) - np.outer(q, q), np.outer(x, x)) for q, x in zip(p, h)]
    infoL = [np.kron(np.diag(q) - np.outer(q, q), np.outer(x, x)) for q, x in zip(pL, hL)]
    if diagonal:
        info, infoL = [np.diag(np.diag(a)) for a in info], [np.diag(np.diag(a)) for a in infoL]
    c, D = len(pL) + budget, info[0].shape[0]
    F_ = sum(info) / len(info)
    M = reg * np.eye(D) + sum(infoL, np.zeros((D, D))) / c

    def objective(M_):
        return np.trace(np.linalg.inv(M_) @ F_)

    chosen, gains = [], []
    for _ in range(min(len(p), math.ceil(oversample * budget))):
        obj = [objective(M + info[i] / c) if i not in chosen else np.inf for i in range(len(p))]
        i = int(np.argmin(obj))
        gains.append(objective(M) - obj[i])
        chosen.append(i)
        M = M + info[i] / c
    while len(chosen) > budget:
        j = int(np.argmin([objective(M - info[i] / c) for i in chosen]))
        M = M - info[chosen[j]] / c
        del chosen[j], gains[j]
    return chosen, gains


@pytest.mark.parametrize("fisher", ["full", "diagonal"])
@pytest.mark.parametrize("oversample", [1.0, 2.0, 3.5])
def test_bait_matches_materialized_fisher_greedy(fisher, oversample):
    ids, p, h = _pool(24, 3, 3, seed=7)
    _, pL, hL = _pool(5, 3, 3, seed=8)
    chosen, gains = _bait_reference(p, h, pL, hL, 4, oversample, 0.5, fisher == "diagonal")
    stats = {"labeled_probs": pL, "labeled_features": hL.astype(np.float32)}
    got, scores = BAIT(fisher, oversample, reg=0.5).select(_chunks(ids, probs=p, features=h), stats, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(got, ids[chosen])
    np.testing.assert_allclose(scores, gains, rtol=1e-6)


@pytest.mark.parametrize("fisher", ["full", "diagonal"])
@pytest.mark.parametrize("seed, reg", [(0, 0.02), (1, 0.1), (3, 0.02), (7, 0.1)])
def test_bait_backward_steps_match_the_reference_with_a_weak_ridge(fisher, seed, reg):
    # with a small ridge the removals' losses differ enough to change the kept set
    ids, p, h = _pool(24, 3, 3, seed=seed + 50)
    _, pL, hL = _pool(5, 3, 3, seed=seed + 100)
    chosen, _ = _bait_reference(p, h, pL, hL, 4, 2.0, reg, fisher == "diagonal")
    stats = {"labeled_probs": pL, "labeled_features": hL}
    got, _ = BAIT(fisher, 2.0, reg=reg).select(_chunks(ids, probs=p, features=h), stats, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(got, ids[chosen])


@pytest.mark.parametrize("reg, scale", [(1e-6, 1.0), (1e-5, 1.0), (1.0, 3000.0)])
def test_bait_full_keeps_its_picks_with_a_ridge_far_below_the_information(reg, scale):
    # features with a common offset: the rank-K updates of M's inverse cancel about 1 / reg of
    # their digits, so the selection runs again from M itself
    g = np.random.default_rng(0)
    z = g.normal(size=(12, 3)) * 2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = (3.0 + 0.1 * g.normal(size=(12, 2))) * scale
    ids = np.arange(100, 112)
    stats = {"labeled_probs": p[:0], "labeled_features": h[:0]}
    chosen, gains = _bait_reference(p, h, p[:0], h[:0], 3, 2.0, reg, False)
    got, scores = BAIT("full", 2.0, reg).select(_chunks(ids, probs=p, features=h), stats, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(got, ids[chosen])
    np.testing.assert_allclose(scores, gains, rtol=1e-6)


def test_bait_full_keeps_its_rank_k_updates_where_they_hold_their_digits(monkeypatch):
    from dynal.strategies import embedding

    refreshes = []
    plain = embedding._FullFisher._refresh
    monkeypatch.setattr(embedding._FullFisher, "_refresh", lambda self: refreshes.append(1) or plain(self))
    ids, p, h = _pool(24, 3, 3, seed=7)
    BAIT("full", 2.0, reg=0.5).select(_chunks(ids, probs=p, features=h), {"labeled_probs": p[:0], "labeled_features": h[:0]}, 4, np.random.default_rng(0))
    assert len(refreshes) == 1  # the state built once, then updated


@pytest.mark.parametrize("fisher", ["full", "diagonal"])
def test_bait_ties_go_to_the_largest_tie_key(fisher):
    ids = np.arange(700, 716)
    p, h = np.tile([[0.5, 0.3, 0.2]], (16, 1)), np.tile([[1.0, -0.5, 2.0]], (16, 1))  # identical candidates
    keys = tie_keys(ids, draw_salt(np.random.default_rng(0)))
    got, _ = BAIT(fisher, 1.0).select(_chunks(ids, probs=p, features=h), {"labeled_probs": p[:0], "labeled_features": h[:0]}, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(got, ids[np.argsort(-keys.astype(np.float64), kind="stable")[:4]])


def test_bait_auto_uses_the_full_fisher_up_to_max_dim():
    ids, p, h = _pool(40, 3, 4, seed=9)
    stats = {"labeled_probs": p[:0], "labeled_features": h[:0]}

    def run(**params):
        return BAIT(**params).select(_chunks(ids, probs=p, features=h), stats, 5, np.random.default_rng(1))[0]

    np.testing.assert_array_equal(run(), run(fisher="full"))
    np.testing.assert_array_equal(run(max_dim=11), run(fisher="diagonal"))
    with pytest.raises(ValueError, match="max_dim"):
        run(fisher="full", max_dim=11)


@pytest.mark.parametrize("params", [{"fisher": "kfac"}, {"oversample": 0.5}, {"reg": 0.0}, {"max_dim": 0}])
def test_bait_bad_parameters(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        make_strategy("bait", **params)


# ----------------------------------------------------------------------------- engine
def test_labeled_outputs_are_the_labeled_sets_features_and_probabilities(blobs, mlp_factory):
    model = mlp_factory()
    X = blobs.train.X[:30]
    stats = labeled_stats(model, ["labeled_outputs"], X, blobs.train.y[:30], batch_size=8)
    with torch.no_grad():
        h = model.features(torch.from_numpy(X))
        np.testing.assert_allclose(stats["labeled_features"], h.numpy(), rtol=1e-6)
        np.testing.assert_allclose(stats["labeled_probs"], F.softmax(model.head(h).double(), 1).numpy(), rtol=1e-6)
    empty = labeled_stats(model, ["labeled_outputs"], X[:0], blobs.train.y[:0])
    assert empty["labeled_features"].shape == (0, 16) and empty["labeled_probs"].shape == (0, blobs.n_classes)


def test_least_confidence_and_bald_keep_the_order_of_confident_samples():
    from dynal.strategies.bayesian import mutual_information
    from dynal.strategies.uncertainty import LeastConfidence

    gaps = np.array([37.0, 39.0, 41.0, 45.0])  # 1 - p_max = e^-gap, below float64's 1.1e-16
    probs = np.stack([1 / (1 + np.exp(-gaps)), np.exp(-gaps) / (1 + np.exp(-gaps))], axis=1)
    scores = LeastConfidence().score({"probs": probs}, {})
    assert np.all(np.diff(scores) < 0) and scores[0] == pytest.approx(np.exp(-37.0), rel=1e-9)
    same = np.repeat(np.random.default_rng(0).dirichlet(np.ones(3), size=(200, 1)), 20, axis=1)
    assert np.all(mutual_information(same) == 0.0)  # identical passes: no information, never below 0
    same[3] = np.nan
    assert np.isnan(mutual_information(same)[3])  # left for the top-b to refuse, not zeroed


def test_entropy_keeps_the_order_of_confident_samples():
    # two classes, logits (m, 0): the entropy is t (m + log1p(e^-m)) + log1p(e^-m) (1 - t) with
    # t = e^-m / (1 + e^-m), about t (m + 1); p_max rounds to 1 past m = 37, whose own term
    # -p log p (about t) is then lost by the plain formula
    gaps = np.array([20.0, 39.0, 40.0, 300.0])
    t = np.exp(-gaps) / (1 + np.exp(-gaps))
    probs = np.stack([1 - t, t], axis=1)
    want = t * gaps + np.log1p(np.exp(-gaps))
    np.testing.assert_allclose(Entropy().score({"probs": probs}, {}), want, rtol=1e-12)


# ----------------------------------------------------------------------------- uncertainty, random
def test_uncertainty_scores_match_their_formulas():
    _, p, _ = _pool(200, 5, 1, seed=11)
    top = np.sort(p, axis=1)
    np.testing.assert_allclose(Margin().score({"probs": p}, {}), -(top[:, -1] - top[:, -2]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(Entropy().score({"probs": p}, {}), -(p * np.log(p)).sum(1), rtol=1e-12)
    np.testing.assert_allclose(LeastConfidence().score({"probs": p}, {}), 1.0 - p.max(1), rtol=1e-9)


@pytest.mark.parametrize("cls, certainty", [
    (Margin, lambda p: np.sort(p, 1)[:, -1] - np.sort(p, 1)[:, -2]),
    (Entropy, lambda p: (p * np.log(p)).sum(1)),
    (LeastConfidence, lambda p: p.max(1)),
])
def test_uncertainty_queries_pick_the_most_uncertain(cls, certainty):
    ids, p, _ = _pool(60, 4, 1, seed=13)
    got, _ = cls().select(_chunks(ids, probs=p), {}, 9, np.random.default_rng(0))
    np.testing.assert_array_equal(got, ids[np.argsort(certainty(p), kind="stable")[:9]])


def test_random_sampling_is_uniform_and_follows_the_generator():
    ids = np.arange(300, 320)
    counts, picks = np.zeros(20), set()
    for seed in range(400):
        got, _ = RandomSampling().select(_chunks(ids), {}, 5, np.random.default_rng(seed))
        picks.add(tuple(sorted(got.tolist())))
        counts[got - 300] += 1
    assert len(picks) > 200 and chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_gather_refuses_a_single_non_finite_value(bad):
    X = np.ones((10, 3))
    X[4, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        gather(_chunks(np.arange(10), features=X), ["features"])
