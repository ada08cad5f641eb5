"""Query time and peak memory of each strategy against pool size (CPU).

The pool: N synthetic inputs in R^32 from a 10-class Gaussian mixture, with stable ids. The
model: an MLP 32-64-10 with dropout 0.2 (d = 64, K = 10, so K·d = 640 and BAIT's default is the
full Fisher), trained for 20 epochs on 200 random labeled samples. Then one
``ActiveLearner.query(b)``: the streamed pool pass plus the selection, timed, with its peak memory
(the sampled growth of resident memory, ``dynal.resources.Measure``; the pool itself, loaded
before, is not counted). Each (strategy, N, b) runs in a fresh process, so memory freed by an
earlier run cannot hide a later one's growth.

Exact BAIT costs O(b·N·K²(d + K)); it runs at the smallest pool size only, and the larger cells
show its time extrapolated linearly in N from there, marked "est.".

Usage: python benchmarks/strategy_scaling.py [--sizes 10000 100000 1000000] [--budgets 100 1000]
                                             [--out benchmarks/strategy_scaling.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

from dynal import ActiveLearner, Split, TrainConfig, model_factory
from dynal.strategies import make_strategy

DIM, K, HIDDEN, DROPOUT, N_LABELED = 32, 10, 64, 0.2, 200

# label, registry name, parameters, largest pool size run (None: all)
CASES = [
    ("random", "random", {}, None),
    ("entropy", "entropy", {}, None),
    ("dynamical (last)", "dynamical", {}, None),
    ("egl", "egl", {}, None),
    ("bald (T=20)", "bald", {}, None),
    ("coreset", "coreset", {}, None),
    ("badge", "badge", {}, None),
    ("bait (full Fisher)", "bait", {"fisher": "full"}, 10_000),
    ("bait (diagonal)", "bait", {"fisher": "diagonal"}, None),
]


def pool(n: int, seed: int = 0) -> Split:
    """A 10-class Gaussian mixture in R^32 with shuffled, non-positional ids."""
    g = np.random.default_rng(seed)
    means = 1.5 * g.normal(size=(K, DIM))
    y = g.integers(0, K, n)
    X = (means[y] + g.normal(size=(n, DIM))).astype(np.float32)
    return Split(g.permutation(10 * n)[:n].astype(np.int64), X, y)


def one(name: str, params: dict, n: int, budget: int) -> dict:
    """One query in this process: seconds and peak resident-memory growth."""
    split = pool(n)
    factory = model_factory("mlp", (DIM,), K, hidden=[HIDDEN], dropout=DROPOUT)
    learner = ActiveLearner(split, factory, make_strategy(name, **params), K, TrainConfig(epochs=20, batch_size=64), rng=0)
    learner.initialize(N_LABELED)
    learner.fit()
    q = learner.query(budget)
    return {"seconds": q.seconds, "peak_bytes": q.peak_memory}


def _cell(results: dict, key: tuple, what: str) -> str:
    r = results.get(key)
    if r is not None:
        if what == "seconds":
            return f"{r['seconds']:.2f}"
        return f"{r['peak_bytes'] / 2**20:.0f}" if what == "memory" else f"{r['peak_bytes'] / key[1]:.0f}"
    label, n, b = key
    ran = sorted(m for (lab, m, bb) in results if lab == label and bb == b)
    if what == "seconds" and ran:  # linear in N at a fixed budget
        return f"~{results[(label, ran[-1], b)]['seconds'] * n / ran[-1]:.0f} (est.)"
    return "skipped"


def table(results: dict, sizes: list[int], budgets: list[int], what: str) -> str:
    cols = [(n, b) for n in sizes for b in budgets]
    head = "| strategy | " + " | ".join(f"N={n:.0e}, b={b}".replace("e+0", "e") for n, b in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for label, *_ in CASES:
        lines.append(f"| {label} | " + " | ".join(_cell(results, (label, n, b), what) for n, b in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--out", default="benchmarks/strategy_scaling.md")
    parser.add_argument("--one", nargs=4, metavar=("NAME", "PARAMS", "N", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, params, n, b = args.one
        print(json.dumps(one(name, json.loads(params), int(n), int(b))))
        return
    results: dict[tuple, dict] = {}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    for label, name, params, max_n in CASES:
        for n in args.sizes:
            for b in args.budgets:
                if max_n is not None and n > max_n:
                    continue
                cmd = [sys.executable, __file__, "--one", name, json.dumps(params), str(n), str(b)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results[(label, n, b)] = json.loads(out.strip().splitlines()[-1])
                print(label, n, b, results[(label, n, b)], flush=True)
    command = "python benchmarks/strategy_scaling.py " + " ".join(sys.argv[1:])
    text = f"""# Strategy scaling: query time and peak memory against pool size

Produced by `{command.strip()}` in {time.perf_counter() - start:.0f} s on {platform.processor() or platform.machine()}
({os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads, Python {platform.python_version()});
1-minute load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (the machine was shared).

Pool: N synthetic inputs in R^{DIM} (a {K}-class Gaussian mixture); model: MLP {DIM}-{HIDDEN}-{K} with dropout
{DROPOUT} (d = {HIDDEN}, K = {K}), trained on {N_LABELED} labeled samples. One `ActiveLearner.query(b)` per cell,
each in a fresh process: the streamed pool pass (chunks of 1024) plus the selection.

## Query time (seconds)

{table(results, args.sizes, args.budgets, "seconds")}

## Peak memory (MiB of resident-memory growth during the query)

{table(results, args.sizes, args.budgets, "memory")}

## Peak memory per pool sample (bytes): constant in N means linear growth

{table(results, args.sizes, args.budgets, "per-sample")}

For scale, at N = 10^6 an N×N float64 distance matrix would take {8e12 / 2**40:.1f} TiB and a materialized
N×(K·d) float64 gradient embedding {8e6 * K * HIDDEN / 2**30:.1f} GiB.
"""
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
