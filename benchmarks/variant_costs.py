"""What each dynamicAL variant costs, against plain inference, on the same pool in one run.

For the MLP, the small CNN and ResNet-18 w0.5 of benchmarks/engine_speed.py (same models,
labeled set and chunks; ResNet-18 on a smaller pool), one fresh process per model times,
interleaved over the rounds, the fastest plain inference (batches of 16 to 1,024) and one
query of b = 100 with each variant:
  last                 dynamical, params="last" (the default)
  last expected        pseudo_label="expected"
  last train_term=0    train_term=0 (no labeled-set term)
  greedy               dynamical-greedy (the pool's last-layer factors, greedy and top-b)
  all                  dynamical, params="all"
  all expected         params="all", pseudo_label="expected" (K backward passes)
  all train_term=0     params="all", train_term=0
Each variant's labeled-set statistics are computed once beforehand (one pass over the labeled
set, as in engine_speed.py), and every path runs once untimed before the rounds. Greedy runs
last in each round and is followed by half a second of sleep and an inference pass (neither
reported), so that the next round does not start beside numpy's spinning threads. The table gives each variant's best time over the rounds as a
multiple of inference's best: ratios taken side by side in one process, which hold on a
loaded machine where absolute speeds do not.

Usage: python benchmarks/variant_costs.py [--threads 2] [--rounds 5] [--out benchmarks/variant_costs.md]
"""

from __future__ import annotations

import time

from engine_speed import CASES, INFERENCE_BATCHES, bench_cli, best_times, case_data, finish, inference, query, setting

from dynal.engine import labeled_stats
from dynal.strategies import make_strategy

VARIANTS = {
    "last": ("dynamical", {}),
    "last expected": ("dynamical", {"pseudo_label": "expected"}),
    "last train_term=0": ("dynamical", {"train_term": 0.0}),
    "all": ("dynamical", {"params": "all"}),
    "all expected": ("dynamical", {"params": "all", "pseudo_label": "expected"}),
    "all train_term=0": ("dynamical", {"params": "all", "train_term": 0.0}),
    "greedy": ("dynamical-greedy", {}),  # last in each round, see SETTLE
}
# engine_speed.py's cases: the MLP at the library's default chunk, the small CNN, ResNet-18 w0.5
# on 256 images (its "all expected" takes about ten times "all")
MODELS = [(1, None), (2, None), (3, 256)]
# Greedy's numpy arithmetic leaves numpy's BLAS threads spinning on the cores for a while: a
# params="all" pass on the MLP right after it took 1.5x its time. So each round ends with a
# settle run after greedy (timed, not reported): this many seconds of sleep, then a warm-up
# inference.
SETTLE = 0.5


def timings(case: int, n_pool: int | None, threads: int, rounds: int) -> dict:
    """Best seconds of inference and of each variant's query, interleaved over ``rounds``."""
    model, X, X_lab, y_lab, chunk = case_data(case, threads, n_pool)
    runs = {f"inference/{b}": (lambda b=b: inference(model, X, b)) for b in INFERENCE_BATCHES if b <= len(X)}
    for variant, (strategy_name, options) in VARIANTS.items():
        strategy = make_strategy(strategy_name, **options)
        stats = labeled_stats(model, strategy.labeled, X_lab, y_lab, batch_size=chunk)
        runs[variant] = lambda s=strategy, st=stats: query(model, X, chunk, s, st)
    runs["settle"] = lambda: (time.sleep(SETTLE), inference(model, X[: 2 * chunk], chunk))
    for run in runs.values():  # warm-up: a first params="all" query took 4x the next ones
        run()
    best = best_times(runs, {p: 1.0 for p in runs}, rounds)
    return {"label": CASES[case][0], "n": len(X), "chunk": chunk, **best}


def main() -> None:
    args, pool = bench_cli(__doc__, rounds=5)
    lines = [
        f"{setting(args)}; per model one fresh process runs inference and the variants interleaved, {args.rounds} "
        "rounds after one untimed warm-up run of each (each round ending with a pause after greedy, not reported), "
        "and keeps each one's best; each variant's time as a multiple of the fastest plain inference.",
        "",
        f"| model | pool | chunk | (a) inference img/s (batch) | {' | '.join(VARIANTS)} |",
        "|---|---|---|---|" + "---|" * len(VARIANTS),
    ]
    for case, n_pool in MODELS:
        t = pool.submit(timings, case, n_pool, args.threads, args.rounds).result()
        ratios = " | ".join(f"{t[v] / t['inference']:.2f}x" for v in VARIANTS)
        lines.append(f"| {t['label']} | {t['n']} | {t['chunk']} | {t['n'] / t['inference']:,.0f} ({t['inference_path'].split('/')[1]}) | {ratios} |")
        print(lines[-1], flush=True)
    finish(args, "variant_costs", "Cost of the dynamicAL variants", lines)


if __name__ == "__main__":
    main()
