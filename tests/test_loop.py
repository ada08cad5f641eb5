import warnings

import numpy as np
import pytest
import torch

from dynal import ActiveLearner, TrainConfig, make_strategy, model_factory


@pytest.fixture
def learner(blobs, mlp_factory):
    return ActiveLearner(blobs.train, mlp_factory, "entropy", blobs.n_classes, TrainConfig(epochs=2), rng=0)


def test_labeled_set_grows_by_budget_and_labels_carry_rounds(learner):
    init = learner.initialize(10)
    assert len(init) == 10
    for rnd in (1, 2, 3):
        learner.fit()
        q = learner.query(7)
        assert q.round == rnd
        learner.update(q.ids)
        assert len(learner.labeled_ids()) == 10 + 7 * rnd
        assert {learner.state.rounds[i] for i in q.ids.tolist()} == {rnd}
    assert {learner.state.rounds[i] for i in init.tolist()} == {0}
    ids = learner.labeled_ids()
    np.testing.assert_array_equal(learner.labels(), learner.pool.y[learner.pool.positions(ids)])


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5])
def test_the_chunk_size_is_a_positive_integer(blobs, mlp_factory, chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        ActiveLearner(blobs.train, mlp_factory, "entropy", blobs.n_classes, chunk_size=chunk_size)


def test_update_rejects_bad_ids_and_labels(learner, blobs):
    learner.initialize(blobs.train.ids[:5])
    with pytest.raises(KeyError, match="not in the pool"):
        learner.update(np.array([10**9]))
    with pytest.raises(ValueError, match="already labeled"):
        learner.update(blobs.train.ids[:2])
    with pytest.raises(ValueError, match="duplicates"):
        learner.update(blobs.train.ids[[7, 7]])
    with pytest.raises(ValueError, match="outside the class range"):
        learner.update(blobs.train.ids[[8]], np.array([3]))
    with pytest.raises(ValueError, match="1 ids but 2 labels"):
        learner.update(blobs.train.ids[[8]], np.array([0, 1]))
    # nothing was stored by the failed calls
    assert len(learner.labeled_ids()) == 5
    learner.update(blobs.train.ids[[8]], np.array([2]))
    assert learner.state.labels[int(blobs.train.ids[8])] == 2


def test_ignored_ids_leave_the_pool(learner, blobs):
    learner.initialize(blobs.train.ids[:5])
    learner.ignore(blobs.train.ids[5:50])
    learner.fit()
    q = learner.query(20)
    assert not np.isin(q.ids, blobs.train.ids[:50]).any()
    assert len(learner.unlabeled_ids()) == len(blobs.train) - 50


def test_ignore_checks_its_ids_and_stores_nothing_on_error(learner, blobs):
    learner.initialize(blobs.train.ids[:5])
    for bad, error, message in [(blobs.train.ids[:1], ValueError, "already labeled"), (np.array([10**9]), KeyError, "not in the pool"),
                                (blobs.train.ids[[7, 7]], ValueError, "duplicates")]:
        with pytest.raises(error, match=message):
            learner.ignore(bad)
    assert not learner.state.ignored and len(learner.unlabeled_ids()) == len(blobs.train) - 5


def test_unlabeled_ids_keep_the_split_order(blobs, mlp_factory):
    from dynal import Split

    perm = np.random.default_rng(0).permutation(len(blobs.train))
    split = Split(blobs.train.ids[perm], blobs.train.X[perm], blobs.train.y[perm])
    learner = ActiveLearner(split, mlp_factory, "entropy", blobs.n_classes, rng=0)
    learner.initialize(split.ids[[3, 9, 27]])
    learner.ignore(split.ids[[5]])
    np.testing.assert_array_equal(learner.unlabeled_ids(), np.delete(split.ids, [3, 5, 9, 27]))


def test_a_strict_query_of_exactly_what_is_left_is_allowed(learner, blobs):
    learner.initialize(blobs.train.ids[:12])
    learner.ignore(blobs.train.ids[20:])
    learner.fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = learner.query(8, strict=True)
    assert sorted(q.ids.tolist()) == sorted(blobs.train.ids[12:20].tolist())


def test_a_strategy_returning_a_labeled_or_ignored_id_breaks_the_contract(learner, blobs):
    learner.initialize(blobs.train.ids[:12])
    learner.ignore(blobs.train.ids[15:16])
    learner.fit()
    for bad in (blobs.train.ids[0], blobs.train.ids[15]):  # labeled, ignored
        learner.strategy.select = lambda chunks, stats, budget, rng, bad=bad: (np.array([blobs.train.ids[30], bad]), np.zeros(2))
        with pytest.raises(RuntimeError, match="broke the contract"):
            learner.query(2)


def test_labels_given_before_the_first_query_are_stamped_round_zero(learner, blobs):
    learner.initialize(blobs.train.ids[:5])
    learner.update(blobs.train.ids[[9, 10]])
    assert learner.state.rounds[int(blobs.train.ids[9])] == 0
    learner.fit()
    q = learner.query(3)
    learner.update(q.ids)
    assert {learner.state.rounds[i] for i in q.ids.tolist()} == {1}


def test_labeled_statistics_pair_each_input_with_its_label(blobs, mlp_factory):
    from dynal.engine.outputs import last_layer_grad_sum

    learner = ActiveLearner(blobs.train, mlp_factory, "dynamical", blobs.n_classes, TrainConfig(epochs=2), rng=0)
    learner.initialize(blobs.train.ids[:10])
    learner.update(blobs.train.ids[[40, 20, 33, 11, 25]])  # labeled out of id order
    learner.fit()
    _, stats = learner.scan(["probs"], ["last_layer_grad_sum"])
    labeled = np.array(sorted(learner.state.labels))
    X, y = blobs.train.X[blobs.train.positions(labeled)], np.array([learner.state.labels[i] for i in labeled])
    ref = last_layer_grad_sum(learner.model, X, y, 64)
    np.testing.assert_allclose(stats["A"], ref["A"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(stats["a"], ref["a"], rtol=1e-6, atol=1e-8)


def test_mc_dropout_masks_come_from_the_learners_generator(blobs):
    factory = model_factory("mlp", blobs.input_shape, blobs.n_classes, hidden=[16], dropout=0.3)
    runs = []
    for _ in range(2):
        learner = ActiveLearner(blobs.train, factory, "bald", blobs.n_classes, TrainConfig(epochs=2, batch_size=32), rng=4)
        learner.initialize(blobs.train.ids[:12])
        learner.fit()
        runs.append([learner.scan(["mc_probs"], options={"mc_probs": {"passes": 3}})[0]["mc_probs"] for _ in range(2)])
    np.testing.assert_array_equal(runs[0][0], runs[1][0])  # the same seed replays the masks
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.allclose(runs[0][0], runs[0][1])  # and a second scan draws new ones


def test_initial_draw_skips_ignored_ids_and_does_not_depend_on_pool_order(blobs, mlp_factory):
    learner = ActiveLearner(blobs.train, mlp_factory, "entropy", blobs.n_classes, rng=3)
    learner.ignore(blobs.train.ids[3:])
    with pytest.raises(ValueError, match=r"initial size must be in \[1, 3\]"):
        learner.initialize(5)
    assert sorted(learner.initialize(3).tolist()) == sorted(blobs.train.ids[:3].tolist())
    order = np.random.default_rng(0).permutation(len(blobs.train))
    shuffled = type(blobs.train)(ids=blobs.train.ids[order], X=blobs.train.X[order], y=blobs.train.y[order])
    picks = [ActiveLearner(split, mlp_factory, "entropy", blobs.n_classes, rng=3).initialize(10) for split in (blobs.train, shuffled)]
    np.testing.assert_array_equal(picks[0], picks[1])


def test_a_call_that_raises_leaves_the_seeded_draws_as_they_were(blobs, mlp_factory):
    fresh = ActiveLearner(blobs.train, mlp_factory, "random", blobs.n_classes, TrainConfig(epochs=1), rng=7)
    retried = ActiveLearner(blobs.train, mlp_factory, "random", blobs.n_classes, TrainConfig(epochs=1), rng=7)
    retried.oracle = lambda ids: np.full(len(ids), 7)  # a label outside the class range: rejected
    with pytest.raises(ValueError, match="outside the class range"):
        retried.initialize(5)
    retried.oracle = fresh.oracle
    np.testing.assert_array_equal(retried.initialize(5), fresh.initialize(5))
    fresh.fit()
    retried.fit()
    strategy = retried.strategy
    retried.strategy = make_strategy("badge")
    retried.strategy.select = lambda *a: (_ for _ in ()).throw(KeyboardInterrupt())  # interrupted mid-query
    with pytest.raises(KeyboardInterrupt):
        retried.query(4)
    retried.strategy = strategy
    np.testing.assert_array_equal(retried.query(4).ids, fresh.query(4).ids)


def test_a_strategy_that_raises_mid_pass_leaves_the_model_mode_and_threads_as_they_were(learner):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    learner.initialize(10)
    learner.fit()
    learner.model.train()
    before = blas_threads()

    def select(chunks, stats, budget, rng):
        next(chunks)  # the pass is under way: eval mode, BLAS limited to one thread
        raise ValueError("a strategy's own error")

    learner.strategy.select = select
    with pytest.raises(ValueError, match="own error") as caught:  # ``caught`` keeps the traceback alive
        learner.query(4)
    assert caught.value is not None and learner.model.training and blas_threads() == before


def test_a_model_that_does_not_fit_the_task_is_refused_when_built(blobs):
    wrong = model_factory("mlp", blobs.input_shape, blobs.n_classes + 1, hidden=[4])
    learner = ActiveLearner(blobs.train, wrong, "entropy", blobs.n_classes, rng=0)
    learner.initialize(5)
    with pytest.raises(ValueError, match=f"head has {blobs.n_classes + 1} outputs but the task has {blobs.n_classes} classes"):
        learner.fit()


def test_initial_set_missing_classes_keeps_all_outputs(blobs, mlp_factory):
    only_zero = blobs.train.ids[blobs.train.y == 0][:6]
    learner = ActiveLearner(blobs.train, mlp_factory, "dynamical", blobs.n_classes, TrainConfig(epochs=2), rng=0)
    learner.initialize(only_zero)
    learner.fit()
    assert learner.model.head.out_features == blobs.n_classes
    assert len(learner.query(5).ids) == 5


def test_human_labels_without_oracle(blobs, mlp_factory):
    from dynal import Split

    unlabeled = Split(blobs.train.ids, blobs.train.X, None)
    learner = ActiveLearner(unlabeled, mlp_factory, "margin", blobs.n_classes, TrainConfig(epochs=2), rng=0)
    with pytest.raises(ValueError, match="no oracle"):
        learner.initialize(4)
    learner.initialize(blobs.train.ids[:4], labels=np.array([0, 1, 2, 0]))
    learner.fit()
    q = learner.query(3)
    learner.update(q.ids, labels=np.array([1, 1, 2]))
    assert len(learner.labeled_ids()) == 7


def test_call_order_and_names_are_checked(blobs, mlp_factory):
    learner = ActiveLearner(blobs.train, mlp_factory, "random", blobs.n_classes, rng=0)
    with pytest.raises(ValueError, match="initialize"):
        learner.fit()
    learner.initialize(3)
    with pytest.raises(ValueError, match="fit"):
        learner.query(2)
    with pytest.raises(ValueError, match="already initialized"):
        learner.initialize(3)
    with pytest.raises(ValueError, match="choose one of"):
        make_strategy("coresets")
    with pytest.raises(ValueError, match="no parameter"):
        make_strategy("entropy", temperature=2)
    for name in ("random", "entropy"):  # no parameters at all: not even `args` or `kwargs`
        with pytest.raises(ValueError, match=r"has no parameter\(s\) \['kwargs'\]; it takes none"):
            make_strategy(name, kwargs=1)
    with pytest.raises(ValueError, match="train_term"):
        make_strategy("dynamical", train_term=-1)


def test_same_seed_same_training(blobs):
    factory = model_factory("mlp", blobs.input_shape, blobs.n_classes, hidden=[8], dropout=0.2)
    accs = []
    for _ in range(2):
        learner = ActiveLearner(blobs.train, factory, "random", blobs.n_classes, TrainConfig(epochs=3, val_fraction=0.25), rng=7)
        learner.initialize(40)
        result = learner.fit()
        accs.append((result.history, learner.evaluate(blobs.test.X, blobs.test.y)))
    assert accs[0] == accs[1]


def test_warm_start_keeps_the_model_and_reinit_replaces_it(blobs, mlp_factory):
    for warm in (True, False):
        learner = ActiveLearner(blobs.train, mlp_factory, "random", blobs.n_classes, TrainConfig(epochs=1, warm_start=warm), rng=0)
        learner.initialize(10)
        learner.fit()
        first = learner.model
        learner.fit()
        assert (learner.model is first) == warm


def test_a_warm_started_fit_that_fails_leaves_the_model_as_it_was(blobs, mlp_factory):
    config = TrainConfig(epochs=3, batch_size=8, warm_start=True)
    runs = []
    for interrupt in (False, True):
        learner = ActiveLearner(blobs.train, mlp_factory, "random", blobs.n_classes, config, rng=1)
        learner.initialize(20)
        learner.fit()
        if interrupt:  # the second round's training stops after a few steps
            calls = []

            def stop(module, inputs):
                calls.append(1)
                if len(calls) == 3:
                    raise KeyboardInterrupt

            handle = learner.model.register_forward_pre_hook(stop)
            with pytest.raises(KeyboardInterrupt):
                learner.fit()
            handle.remove()
        learner.fit()
        runs.append(torch.cat([p.detach().flatten() for p in learner.model.parameters()]))
    assert torch.equal(runs[0], runs[1])
