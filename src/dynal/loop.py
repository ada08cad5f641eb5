"""The active-learning loop: a learner with initialize / query / update / ignore."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dynal.data.arrays import check_labels
from dynal.data.dataset import Split
from dynal.engine.outputs import Context, dropout_layers
from dynal.engine.pool import labeled_stats, pool_chunks
from dynal.resources import Measure
from dynal.strategies import Strategy, make_strategy
from dynal.strategies.collect import gather
from dynal.training import FitResult, TrainConfig, build_model, evaluate, fit, seed_from
from dynal.validation import is_integer

Oracle = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Query:
    """One query's result.

    Attributes
    ----------
    ids : dataset ids to label, in pick order
    scores : each id's score when picked
    round : the round these labels will be stamped with
    strategy : the strategy's name and parameters
    seconds : wall time of the pool pass and selection
    peak_memory : peak resident-memory growth during the query, bytes
    """

    ids: np.ndarray
    scores: np.ndarray
    round: int
    strategy: dict[str, Any]
    seconds: float
    peak_memory: int


@dataclass
class LabelState:
    """Which ids are labeled, with which label, in which round; and which are ignored."""

    labels: dict[int, int] = field(default_factory=dict)
    rounds: dict[int, int] = field(default_factory=dict)
    ignored: set[int] = field(default_factory=set)

    def add(self, ids: np.ndarray, labels: np.ndarray, round: int) -> None:
        for i, y in zip(ids.tolist(), labels.tolist()):
            self.labels[i] = y
            self.rounds[i] = round

    def labeled_ids(self) -> np.ndarray:
        return np.fromiter(self.labels, dtype=np.int64, count=len(self.labels))

    def excluded(self) -> np.ndarray:
        """Ids that are not in the pool: labeled or ignored."""
        return np.fromiter([*self.labels, *self.ignored], dtype=np.int64)


def check_model(model: nn.Module, n_classes: int, strategy: Strategy) -> None:
    """Raise a clear error when ``model`` cannot serve ``strategy`` on ``n_classes`` classes: the
    loop's contract is a ``features`` module and a ``head`` with one output per class, and
    MC-dropout strategies need dropout layers."""
    head = getattr(model, "head", None)
    if not callable(getattr(model, "features", None)) or not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} needs a `features` module and a `head` (see the README's Models section)")
    outputs = getattr(head, "out_features", None)
    if outputs is not None and outputs != n_classes:
        raise ValueError(f"the model's head has {outputs} outputs but the task has {n_classes} classes")
    if "mc_probs" in strategy.outputs:
        dropout_layers(model)


def pool_pass(
    model: nn.Module,
    X: np.ndarray,
    ids: np.ndarray,
    outputs: Sequence[str],
    X_labeled: np.ndarray,
    y_labeled: np.ndarray,
    labeled: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    rng: np.random.Generator,
    chunk_size: int = 1024,
    progress: bool = False,
    rows: np.ndarray | None = None,
) -> tuple[Iterator[dict[str, np.ndarray]], dict[str, Any]]:
    """The labeled set's statistics ``labeled`` and a lazy pass computing ``outputs`` over the
    pool (the ``rows`` of ``X``, default all, with dataset ids ``ids``); ``rng`` seeds the
    pass's torch generator."""
    stats = labeled_stats(model, labeled, X_labeled, y_labeled)
    ctx = Context(model, stats, torch.Generator().manual_seed(seed_from(rng)), options)
    return pool_chunks(model, X, ids, outputs, ctx, chunk_size, progress, rows), stats


def gathered(chunks: Iterator[dict[str, np.ndarray]], stats: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A :func:`pool_pass` run to its end: the pool's ``ids`` and outputs as whole arrays, and
    the labeled-set statistics."""
    with closing(chunks):
        ids, arrays = gather(chunks)
    return {"ids": ids, **arrays}, stats


class ActiveLearner:
    """Pool-based active learning over a split with stable dataset ids.

    Parameters
    ----------
    pool : the split to label (its ``y`` is used only by the simulated oracle)
    model_factory : zero-argument callable building a fresh model
    strategy : registry name or a :class:`~dynal.strategies.Strategy`
    n_classes : number of classes of the task (from the dataset, never from labels seen)
    train_config : how to train each round
    rng : the generator every random choice draws from
    oracle : ``ids -> labels`` used when :meth:`initialize` or :meth:`update` get no labels;
        defaults to the pool's hidden labels when the split has them
    chunk_size : rows per chunk of the pool scan (forward passes take cache-sized parts of a chunk)
    progress : show progress bars
    """

    def __init__(
        self,
        pool: Split,
        model_factory: Callable[[], nn.Module],
        strategy: str | Strategy,
        n_classes: int,
        train_config: TrainConfig | None = None,
        rng: np.random.Generator | int | None = None,
        oracle: Oracle | None = None,
        chunk_size: int = 1024,
        progress: bool = False,
    ) -> None:
        self.pool = pool
        self.model_factory = model_factory
        self.strategy = make_strategy(strategy)
        self.n_classes = int(n_classes)
        self.train_config = train_config or TrainConfig()
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        if oracle is None and pool.y is not None:
            oracle = self._simulated_oracle
        self.oracle = oracle
        if not is_integer(chunk_size) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = int(chunk_size)
        self.progress = progress
        self.state = LabelState()
        self.round = 0
        self.model: nn.Module | None = None

    @contextmanager
    def _draws(self) -> Iterator[None]:
        """Give the generator its state back when the block fails, so that a call that raised
        (a rejected label, an interrupted query) leaves the seeded sequence of draws as it was."""
        state = self.rng.bit_generator.state
        try:
            yield
        except BaseException:
            self.rng.bit_generator.state = state
            raise

    def _simulated_oracle(self, ids: np.ndarray) -> np.ndarray:
        assert self.pool.y is not None
        return self.pool.y[self.pool.positions(ids)]

    # ----- the labeled set and the pool
    def labeled_ids(self) -> np.ndarray:
        """Ids labeled so far, in labeling order."""
        return self.state.labeled_ids()

    def unlabeled_ids(self) -> np.ndarray:
        """Ids still in the pool (neither labeled nor ignored), in split order."""
        return self.pool.ids[~np.isin(self.pool.ids, self.state.excluded())]

    def labels(self) -> np.ndarray:
        """Labels of :meth:`labeled_ids`, aligned."""
        return np.fromiter(self.state.labels.values(), dtype=np.int64, count=len(self.state.labels))

    def _check_new_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError("ids must be a one-dimensional array of integer dataset ids")
        ids = ids.astype(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids contain duplicates")
        unknown = ids[~np.isin(ids, self.pool.ids)]
        if unknown.size:
            raise KeyError(f"ids not in the pool's dataset: {unknown[:10].tolist()}")
        taken = ids[np.isin(ids, self.state.excluded())]
        if taken.size:
            raise ValueError(f"ids already labeled or ignored: {taken[:10].tolist()}")
        return ids

    def _get_labels(self, ids: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        if labels is None:
            if self.oracle is None:
                raise ValueError("no labels given and the learner has no oracle")
            labels = self.oracle(ids)
        labels = check_labels(labels, self.n_classes, what="labels")
        if len(labels) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
        return labels

    # ----- the interactive contract
    def initialize(self, n_or_ids: int | np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Label an initial set: ``n`` ids drawn uniformly from the pool, or the given ids.

        Labels come from ``labels`` or, if omitted, the oracle. Returns the ids, stamped round 0.
        """
        if self.state.labels:
            raise ValueError("the learner is already initialized")
        with self._draws():
            if is_integer(n_or_ids):
                n, candidates = int(n_or_ids), np.sort(self.unlabeled_ids())  # sorted: pool order does not matter
                if not 0 < n <= len(candidates):
                    raise ValueError(f"initial size must be in [1, {len(candidates)}] (the ids not ignored), got {n}")
                ids = np.sort(self.rng.choice(candidates, size=n, replace=False))
            else:
                ids = self._check_new_ids(n_or_ids)
                if ids.size == 0:
                    raise ValueError("the initial set is empty")
            labels = self._get_labels(ids, labels)
        self.state.add(ids, labels, round=0)
        return ids

    def fit(self) -> FitResult:
        """Train the model on the labeled set (re-initialized unless ``warm_start``)."""
        if not self.state.labels:
            raise ValueError("nothing is labeled yet: call initialize() first")
        with self._draws():
            kept = None  # a warm-started model's weights, given back if training fails
            if self.model is None or not self.train_config.warm_start:
                model = build_model(self.model_factory, self.rng)
                check_model(model, self.n_classes, self.strategy)
            else:
                model, kept = self.model, copy.deepcopy(self.model.state_dict())
            ids = self.labeled_ids()
            try:
                result = fit(model, self.pool.X[self.pool.positions(ids)], self.labels(), self.train_config, self.rng)
            except BaseException:
                if kept is not None:
                    model.load_state_dict(kept)
                raise
        self.model = model
        return result

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy of the current model on held-out data (never used to choose anything)."""
        if self.model is None:
            raise ValueError("no model yet: call fit() first")
        return evaluate(self.model, X, y)

    def query(self, budget: int, strict: bool = False) -> Query:
        """Choose up to ``budget`` pool ids to label next with the strategy.

        With fewer than ``budget`` ids left, all that remain are returned with a warning, or
        a ``ValueError`` is raised if ``strict``. Ids are never duplicated.
        """
        if not is_integer(budget):
            raise TypeError(f"budget must be an integer, got {budget!r}")
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        if self.model is None:
            raise ValueError("no model yet: call fit() first")
        pool_ids = self.unlabeled_ids()
        if budget > len(pool_ids):
            msg = f"budget {budget} exceeds the {len(pool_ids)} unlabeled samples left"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg + "; taking them all", stacklevel=2)
            budget = len(pool_ids)
        strategy = self.strategy
        with Measure() as m, self._draws():
            if budget == 0:
                ids, scores = np.empty(0, dtype=np.int64), np.empty(0)
            else:
                chunks, stats = self._pass(pool_ids, strategy.outputs, strategy.labeled, strategy.output_options())
                with closing(chunks):  # a strategy's error ends the pass too (modes, thread limits)
                    ids, scores = strategy.select(chunks, stats, budget, self.rng)
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != budget or len(np.unique(ids)) != len(ids) or np.isin(ids, self.state.excluded()).any():
            raise RuntimeError(f"strategy {strategy.name!r} broke the contract: {len(ids)} ids for budget {budget}")
        self.round += 1
        return Query(ids, np.asarray(scores, dtype=np.float64), self.round, strategy.config(), m.seconds, m.peak_bytes)

    def _pass(self, pool_ids: np.ndarray, outputs: Sequence[str], labeled: Sequence[str],
              options: Mapping[str, Mapping[str, Any]]) -> tuple[Iterator[dict[str, np.ndarray]], dict[str, Any]]:
        """The labeled-set statistics and a lazy pass over ``pool_ids`` computing ``outputs``."""
        assert self.model is not None
        X_labeled = self.pool.X[self.pool.positions(self.labeled_ids())]
        return pool_pass(self.model, self.pool.X, pool_ids, outputs, X_labeled, self.labels(), labeled, options,
                         self.rng, self.chunk_size, self.progress, self.pool.positions(pool_ids))

    def scan(self, outputs: Sequence[str], labeled: Sequence[str] = (),
             options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Compute pool outputs for the whole unlabeled pool (with ``ids``) and labeled-set
        statistics, e.g. ``scan(["probs"])``; for inspection and analysis, not for querying."""
        if self.model is None:
            raise ValueError("no model yet: call fit() first")
        return gathered(*self._pass(self.unlabeled_ids(), outputs, labeled, options or {}))

    def update(self, ids: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Record labels for pool ids (from ``labels`` or the oracle), stamped with the current round."""
        ids = self._check_new_ids(ids)
        labels = self._get_labels(ids, labels)
        self.state.add(ids, labels, self.round)

    def ignore(self, ids: np.ndarray) -> None:
        """Remove pool ids from consideration without labeling them (e.g. unreadable samples)."""
        self.state.ignored.update(self._check_new_ids(ids).tolist())
