"""How good is dynamicAL's subset approximation? (the paper's RQ2)

dynamicAL queries the top-b of single-sample gains, dropping the interactions between queried
samples. This module measures the exact objective ``G(S + Q)`` of that query against the
greedy maximizer of the exact objective and, on tiny pools, the exhaustive optimum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from dynal.data import load_dataset
from dynal.engine.topk import draw_salt, tie_keys
from dynal.experiment import ExperimentConfig
from dynal.loop import ActiveLearner
from dynal.models import model_factory
from dynal.objective import exhaustive, greedy, set_value, top_b
from dynal.strategies import DynamicAL


def _check_budgets(budgets: Sequence[int], name: str) -> None:
    bad = [b for b in budgets if int(b) < 1]
    if bad:
        raise ValueError(f"{name} must be positive query sizes, got {bad}")


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
    _check_budgets(budgets, "budgets")
    too_large = [int(b) for b in budgets if int(b) > len(r)]
    if too_large:
        raise ValueError(f"query sizes {too_large} exceed the pool of {len(r)}")
    out = []
    for b in map(int, budgets):
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

    Returns one record per (round, pool, b) with the fields of :func:`approximation_ratios`
    plus ``round``, ``n_labeled`` and ``pool`` ("full" or "tiny"). Every query size must fit
    the last round's pool (``initial + rounds x budget`` samples fewer than the training set),
    and the tiny budgets the tiny pool; both are checked before any training.
    """
    _check_budgets(budgets, "budgets")
    _check_budgets(tiny_budgets, "tiny budgets")
    if tiny_pool > 20 or max(tiny_budgets, default=0) > 4:
        raise ValueError("the exhaustive optimum needs tiny_pool <= 20 and tiny budgets <= 4")
    if max(tiny_budgets, default=0) > tiny_pool:
        raise ValueError(f"tiny budgets {list(tiny_budgets)} must not exceed the tiny pool of {tiny_pool}")
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
        args = (pool["r"], pool["h"], stats["A"], stats["a"], bool(stats["head_bias"]))
        keys = tie_keys(pool["ids"], draw_salt(rng))
        for row in approximation_ratios(*args, budgets, keys):
            records.append({"round": rnd, "n_labeled": len(learner.labeled_ids()), "pool": "full", **row})
        if tiny_budgets:
            sub = rng.choice(len(pool["ids"]), size=min(tiny_pool, len(pool["ids"])), replace=False)
            tiny = tuple(x[sub] for x in args[:2]) + args[2:]
            for row in approximation_ratios(*tiny, tiny_budgets, keys[sub], optimum=True):
                records.append({"round": rnd, "n_labeled": len(learner.labeled_ids()), "pool": f"tiny({len(sub)})", **row})
        if rnd < config.rounds:
            learner.update(learner.query(config.budget).ids)
    return records


def ratio_table(records: list[dict]) -> str:
    """A text table of :func:`approximation_study` records."""
    lines = ["round  labels  pool        b   G(top-b)/G(best)  G(top-b)/G(greedy)  G(top-b)/G(optimum)"]
    for r in records:
        opt = f"{r['ratio_optimum']:.4f}" if "ratio_optimum" in r else "-"
        lines.append(f"{r['round']:>5}  {r['n_labeled']:>6}  {r['pool']:<10} {r['b']:>3}   {r['ratio']:>16.4f}  {r['ratio_greedy']:>18.4f}  {opt:>19}")
    return "\n".join(lines)
