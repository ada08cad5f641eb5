"""The contract every strategy must keep; a new registered strategy is covered automatically.

Strategies that need parameters, or variants worth covering, are listed in ``VARIANTS``.
"""

import numpy as np
import pytest

from dynal import ActiveLearner, Split, TrainConfig, model_factory
from dynal.strategies import STRATEGIES

VARIANTS = [(name, {}) for name in sorted(STRATEGIES)] + [
    ("dynamical", {"train_term": 0.0}),
    ("dynamical", {"pseudo_label": "expected"}),
    ("dynamical", {"params": "all"}),
    ("dynamical", {"params": "all", "pseudo_label": "expected"}),
    ("dynamical", {"params": "all", "train_term": 0.0}),
    ("bait", {"fisher": "diagonal"}),
]
IDS = [f"{n}{p or ''}" for n, p in VARIANTS]


def _learner(blobs, factory, name, params, seed=0, pool=None):
    if "mc_probs" in STRATEGIES[name].outputs:  # MC dropout needs dropout layers
        factory = model_factory("mlp", blobs.input_shape, blobs.n_classes, hidden=[16], dropout=0.3)
    learner = ActiveLearner(pool or blobs.train, factory, STRATEGIES[name](**params), blobs.n_classes,
                            TrainConfig(epochs=3, batch_size=32), rng=seed, chunk_size=37)
    learner.initialize(blobs.train.ids[:12])
    learner.fit()
    return learner


@pytest.fixture(params=VARIANTS, ids=IDS)
def variant(request):
    return request.param


@pytest.mark.parametrize("budget", [1, 10, 64])
def test_exact_count_distinct_never_labeled(blobs, mlp_factory, variant, budget):
    learner = _learner(blobs, mlp_factory, *variant)
    learner.ignore(blobs.train.ids[12:15])
    q = learner.query(budget)
    assert len(q.ids) == budget == len(q.scores)
    assert len(np.unique(q.ids)) == budget
    assert np.isin(q.ids, learner.unlabeled_ids()).all()
    assert not np.isin(q.ids, blobs.train.ids[:15]).any()
    assert q.seconds >= 0 and q.peak_memory >= 0 and q.strategy["name"] == variant[0]


def test_same_seed_same_ids(blobs, mlp_factory, variant):
    a = _learner(blobs, mlp_factory, *variant, seed=3).query(15).ids
    b = _learner(blobs, mlp_factory, *variant, seed=3).query(15).ids
    np.testing.assert_array_equal(a, b)


def test_pool_order_does_not_change_the_pick(blobs, mlp_factory, variant):
    perm = np.random.default_rng(1).permutation(len(blobs.train))
    shuffled = Split(blobs.train.ids[perm], blobs.train.X[perm], blobs.train.y[perm])
    a = _learner(blobs, mlp_factory, *variant, seed=4).query(15).ids
    b = _learner(blobs, mlp_factory, *variant, seed=4, pool=shuffled).query(15).ids
    assert set(a.tolist()) == set(b.tolist())


def test_budget_beyond_pool_takes_the_rest_without_duplicates(blobs, mlp_factory, variant):
    learner = _learner(blobs, mlp_factory, *variant)
    left = len(learner.unlabeled_ids())
    with pytest.raises(ValueError, match="exceeds"):
        learner.query(left + 5, strict=True)
    with pytest.warns(UserWarning, match="taking them all"):
        q = learner.query(left + 5)
    assert len(q.ids) == left == len(np.unique(q.ids))


def test_select_with_budget_zero_returns_nothing(blobs, mlp_factory, variant):
    learner = _learner(blobs, mlp_factory, *variant)
    s = learner.strategy
    chunks, stats = learner._pass(learner.unlabeled_ids(), s.outputs, s.labeled, s.output_options())
    ids, scores = s.select(chunks, stats, 0, np.random.default_rng(0))
    assert len(ids) == len(scores) == 0


@pytest.mark.parametrize("budget", [0, -3])
def test_bad_budget(blobs, mlp_factory, variant, budget):
    with pytest.raises(ValueError, match="budget must be positive"):
        _learner(blobs, mlp_factory, *variant).query(budget)


def test_non_integer_budget(blobs, mlp_factory, variant):
    with pytest.raises(TypeError, match="budget must be an integer"):
        _learner(blobs, mlp_factory, *variant).query(2.5)
