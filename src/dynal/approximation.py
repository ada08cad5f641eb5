"""How good is dynamicAL's subset approximation? (the paper's RQ2)

dynamicAL queries the top-b of single-sample gains, dropping the interactions between queried
samples. This module measures the exact objective ``G(S + Q)`` of that query against the
greedy maximizer of the exact objective and, on tiny pools, the exhaustive optimum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from dynal.data import load_dataset
from dynal.data.arrays import check_inputs, check_labels
from dynal.engine.topk import draw_salt, tie_keys
from dynal.experiment import ExperimentConfig, StrategySpec
from dynal.loop import ActiveLearner, check_model, gathered, pool_pass
from dynal.models import model_factory
from dynal.objective import exhaustive, greedy, set_value, top_b
from dynal.strategies import DynamicAL, make_strategy
from dynal.validation import is_integer

# The exhaustive optimum's limits: C(20, 4) = 4,845 subsets.
TINY_POOL_MAX, TINY_BUDGET_MAX = 20, 4


def _check_budgets(budgets: Sequence[int], name: str) -> list[int]:
    """``budgets`` as ints; an error naming the bad ones unless all are positive integers."""
    if is_integer(budgets) or isinstance(budgets, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of query sizes, e.g. [5], got {budgets!r}")
    budgets = list(budgets)
    bad = [b for b in budgets if not is_integer(b) or b < 1]
    if bad:
        raise ValueError(f"{name} must be positive integer query sizes, got {bad}")
    return [int(b) for b in budgets]


def _check_plan(budgets: Sequence[int], tiny_pool: int, tiny_budgets: Sequence[int]) -> tuple[list[int], list[int]]:
    """The query sizes of a ratio measurement, checked: positive integers, at least one, and
    tiny ones within the exhaustive optimum's reach and the tiny pool."""
    budgets, tiny_budgets = _check_budgets(budgets, "budgets"), _check_budgets(tiny_budgets, "tiny budgets")
    if not budgets and not tiny_budgets:
        raise ValueError("no query sizes to measure: give budgets, tiny budgets or both")
    if tiny_budgets:
        if not is_integer(tiny_pool) or not 1 <= tiny_pool <= TINY_POOL_MAX:
            raise ValueError(f"the tiny pool must be an integer from 1 to {TINY_POOL_MAX} (the exhaustive optimum's reach), got {tiny_pool!r}")
        if max(tiny_budgets) > TINY_BUDGET_MAX:
            raise ValueError(f"the exhaustive optimum needs tiny budgets <= {TINY_BUDGET_MAX}, got {tiny_budgets}")
        if max(tiny_budgets) > tiny_pool:
            raise ValueError(f"tiny budgets {tiny_budgets} must not exceed the tiny pool of {tiny_pool}")
    return budgets, tiny_budgets


def _ratio(value: float, reference: float) -> float:
    """``value / reference`` for set values (never negative), with 0 / 0 = 1."""
    if reference > 0:
        return value / reference
    return 1.0 if value == 0 else float("inf")


def approximation_ratios(
    r: np.ndarray,
    h: np.ndarray,
    A: np.ndarray,
    a: np.ndarray,
    bias: bool,
    budgets: Sequence[int],
    keys: np.ndarray,
    optimum: bool = False,
) -> list[dict[str, float]]:
    """Exact objective values of top-b, greedy and (optionally) the optimum, per budget.

    Returns one dict per budget with ``b``, ``top_b``, ``greedy`` (pure greedy), ``ratio`` =
    ``G(top-b) / G(best known)`` (best of greedy, top-b and the optimum when computed; in [0, 1],
    0 only where top-b's set has value 0),
    ``ratio_greedy`` = ``G(top-b) / G(pure greedy)`` (above 1 where top-b beats pure greedy,
    infinite where greedy's set has value 0 and top-b's does not) and, with ``optimum``,
    ``optimum`` and ``ratio_optimum`` = ``G(top-b) / G(optimum)``. A ratio of 0 / 0 is 1.
    Every budget must be at most the pool's size.
    """
    budgets = _check_budgets(budgets, "budgets")
    too_large = [b for b in budgets if b > len(r)]
    if too_large:
        raise ValueError(f"query sizes {too_large} exceed the pool of {len(r)}")
    out = []
    for b in budgets:
        t = set_value(r, h, A, a, bias, top_b(r, h, A, a, bias, b, keys))
        g = set_value(r, h, A, a, bias, greedy(r, h, A, a, bias, b, keys)[0])
        row = {"b": b, "top_b": t, "greedy": g, "ratio_greedy": _ratio(t, g)}
        best = max(t, g)
        if optimum:
            row["optimum"] = exhaustive(r, h, A, a, bias, b)[1]
            row["ratio_optimum"] = _ratio(t, row["optimum"])
            best = max(best, row["optimum"])
        row["ratio"] = _ratio(t, best)
        out.append(row)
    return out


def _records(
    pool: dict[str, np.ndarray], stats: dict, budgets: list[int], tiny_pool: int, tiny_budgets: list[int], rng: np.random.Generator
) -> list[dict]:
    """The ratios of one pool's last-layer factors (``pool``: ``ids``, ``r``, ``h``; ``stats``:
    ``A``, ``a``, ``head_bias``) on the whole pool for ``budgets`` and on a sub-pool of
    ``tiny_pool`` ids drawn by ``rng`` for ``tiny_budgets``; ties break by keys drawn by ``rng``."""
    args = (pool["r"], pool["h"], stats["A"], stats["a"], bool(stats["head_bias"]))
    keys = tie_keys(pool["ids"], draw_salt(rng))
    records = [{"pool": "full", **row} for row in approximation_ratios(*args, budgets, keys)]
    if tiny_budgets:
        by_id = np.argsort(pool["ids"], kind="stable")  # the same sub-pool whatever the rows' order
        sub = by_id[rng.choice(len(keys), size=min(tiny_pool, len(keys)), replace=False)]
        tiny = (args[0][sub], args[1][sub], *args[2:])
        records += [{"pool": f"tiny({len(sub)})", **row} for row in approximation_ratios(*tiny, tiny_budgets, keys[sub], optimum=True)]
    return records


def model_ratios(
    model: nn.Module,
    X_pool: np.ndarray,
    X_labeled: np.ndarray,
    y_labeled: np.ndarray,
    budgets: Sequence[int] = (1, 5, 10, 20, 50),
    tiny_pool: int = 16,
    tiny_budgets: Sequence[int] = (2, 3, 4),
    rng: np.random.Generator | int | None = None,
    ids: np.ndarray | None = None,
    chunk_size: int = 1024,
    progress: bool = False,
) -> list[dict]:
    """The approximation ratios of a trained model on a pool, as one round of
    :func:`approximation_study` measures them.

    Parameters
    ----------
    model : a trained model with ``features`` and a linear ``head`` (dynal's model contract)
    X_pool : the unlabeled pool's inputs
    X_labeled, y_labeled : the labeled set ``S`` with its true labels (for ``G_S``)
    budgets : query sizes b on the whole pool (each at most its size)
    tiny_pool, tiny_budgets : a random sub-pool of at most 20 samples and its query sizes (at
        most 4) for the exhaustive optimum; no tiny budgets skip it
    rng : the generator (or a seed) that draws the tie-break keys and the sub-pool
    ids : the pool's dataset ids, which break ties (default ``0 .. N-1``)
    chunk_size : rows per chunk of the pool pass
    progress : show a progress bar over the pool pass

    Returns
    -------
    One record per (pool, b) with the fields of :func:`approximation_ratios` and ``pool``
    ("full", or "tiny(n)" for the sub-pool of n samples).
    """
    budgets, tiny_budgets = _check_plan(budgets, tiny_pool, tiny_budgets)
    n_classes = getattr(getattr(model, "head", None), "out_features", None)  # a head of another form is checked in the pass
    check_model(model, n_classes or 0, DynamicAL())
    X_pool, X_labeled = check_inputs(X_pool, "X_pool"), check_inputs(X_labeled, "X_labeled")
    if X_pool.shape[1:] != X_labeled.shape[1:]:
        raise ValueError(f"X_pool's samples have shape {X_pool.shape[1:]} but X_labeled's {X_labeled.shape[1:]}")
    y_labeled = check_labels(y_labeled, n_classes, "y_labeled")
    if len(y_labeled) != len(X_labeled):
        raise ValueError(f"X_labeled has {len(X_labeled)} rows but y_labeled has {len(y_labeled)} labels")
    if not is_integer(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    ids = np.arange(len(X_pool)) if ids is None else np.asarray(ids)
    if ids.shape != (len(X_pool),) or ids.dtype.kind not in "iu" or len(np.unique(ids)) != len(ids):
        raise ValueError(f"ids must be {len(X_pool)} distinct integers, one per pool row, got {ids.dtype} of shape {ids.shape}")
    for what, sizes in (("query sizes", budgets), ("tiny budgets", tiny_budgets)):
        if max(sizes, default=0) > len(X_pool):
            raise ValueError(f"{what} {[b for b in sizes if b > len(X_pool)]} exceed the pool of {len(X_pool)}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    pool, stats = gathered(*pool_pass(model, X_pool, ids, ["last_layer_grad"], X_labeled, y_labeled, ["last_layer_grad_sum"], {},
                                      rng, chunk_size, progress))
    return _records(pool, stats, budgets, tiny_pool, tiny_budgets, rng)


def approximation_study(
    config: ExperimentConfig,
    budgets: Sequence[int] = (1, 5, 10, 20, 50),
    tiny_pool: int = 16,
    tiny_budgets: Sequence[int] = (2, 3, 4),
    seed: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run dynamicAL (last layer, top-b) on ``config``'s data and model and, each round,
    measure the approximation ratios on the whole pool for ``budgets`` and, against the
    exhaustive optimum, on a random sub-pool of ``tiny_pool`` samples for ``tiny_budgets``.
    ``config.strategies`` is not used: every round labels with ``dynamical``'s defaults.

    Returns one record per (round, pool, b) with the fields of :func:`model_ratios` plus
    ``round`` and ``n_labeled``. Every query size must fit the last round's pool
    (``initial + rounds x budget`` samples fewer than the training set), and the tiny budgets
    the tiny pool; both are checked before any training.
    """
    budgets, tiny_budgets = _check_plan(budgets, tiny_pool, tiny_budgets)
    seed = config.seeds[0] if seed is None else seed
    data = load_dataset(**config.dataset)
    last_pool = len(data.train) - config.initial - config.rounds * config.budget
    largest = max([1, *budgets, *tiny_budgets])
    if last_pool < largest:
        raise ValueError(
            f"the last round's pool has {last_pool} samples ({len(data.train)} training samples - initial {config.initial} "
            f"- {config.rounds} rounds x budget {config.budget}), fewer than the query size {largest}: use fewer rounds or smaller budgets"
        )
    params = {k: v for k, v in config.model.items() if k != "name"}
    factory = model_factory(config.model["name"], data.input_shape, data.n_classes, **params)
    rng = np.random.default_rng(seed)
    learner = ActiveLearner(data.train, factory, DynamicAL(), data.n_classes, config.train, rng, chunk_size=config.chunk_size)
    learner.initialize(config.initial)
    records = []
    for rnd in tqdm(range(config.rounds + 1), desc="approximation ratio", unit="round", disable=not progress):
        learner.fit()
        pool, stats = learner.scan(["last_layer_grad"], ["last_layer_grad_sum"])
        n_labeled = len(learner.labeled_ids())
        records += [{"round": rnd, "n_labeled": n_labeled, **rec} for rec in _records(pool, stats, budgets, tiny_pool, tiny_budgets, rng)]
        if rnd < config.rounds:
            learner.update(learner.query(config.budget).ids)
    return records


def unused_strategies(listed: object) -> list[str]:
    """The entries of a config's ``strategies`` that :func:`approximation_study` does not run
    (all but ``dynamical`` with its default parameters), by label or name; entries that are
    not valid strategies are named too, since nothing reads them."""
    default = DynamicAL().config()
    unused = []
    for entry in listed if isinstance(listed, list) else [listed]:
        try:
            spec = StrategySpec.parse(entry)
        except (TypeError, ValueError):
            unused.append(str(entry.get("label") or entry.get("name") or entry) if isinstance(entry, dict) else str(entry))
            continue
        if spec.name != "dynamical" or make_strategy(spec.name, **spec.params).config() != default:
            unused.append(spec.label)
    return unused


def ratio_table(records: list[dict]) -> str:
    """A text table of :func:`approximation_study` records."""
    lines = ["round  labels  pool        b   G(top-b)/G(best)  G(top-b)/G(greedy)  G(top-b)/G(optimum)"]
    for r in records:
        opt = f"{r['ratio_optimum']:.4f}" if "ratio_optimum" in r else "-"
        lines.append(f"{r['round']:>5}  {r['n_labeled']:>6}  {r['pool']:<10} {r['b']:>3}   {r['ratio']:>16.4f}  {r['ratio_greedy']:>18.4f}  {opt:>19}")
    return "\n".join(lines)
