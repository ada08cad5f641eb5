"""Tables and learning curves computed from an experiment's JSON Lines only."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from dynal.experiment import RESULTS, read_results


def load_records(run: str | Path) -> list[dict]:
    """Records of a run directory (or a ``.jsonl`` file)."""
    path = Path(run)
    if path.is_dir():
        path = path / RESULTS
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    records = read_results(path)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def curves(records: list[dict]) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """``strategy -> seed -> [(n_labeled, accuracy), ...]`` sorted by round."""
    out: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: r["round"]):
        out[r["strategy"]][r["seed"]].append((r["n_labeled"], r["test_accuracy"]))
    return out


def aubc(n_labeled: np.ndarray, accuracy: np.ndarray) -> float:
    """Area under the learning curve, normalized to [0, 1] by the labeled-size range.

    The trapezoid area of accuracy over the number of labels, divided by the span of label
    counts; a single point gives its accuracy.
    """
    n, acc = np.asarray(n_labeled, dtype=float), np.asarray(accuracy, dtype=float)
    if len(n) == 1 or n[-1] == n[0]:
        return float(acc.mean())
    return float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(n)) / (n[-1] - n[0]))


def planned_rounds(run: str | Path) -> int | None:
    """The query rounds a run directory's ``config.json`` plans; ``None`` for a results file
    outside a run directory (any name but ``results.jsonl``) or a directory without one."""
    path = Path(run)
    if not path.is_dir() and path.name != RESULTS:
        return None
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.exists():
        return None
    try:
        rounds = json.loads(config.read_text())["rounds"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{config} is unreadable") from None
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"{config} plans {rounds!r} rounds, not a count")
    return rounds


def incomplete_runs(records: list[dict], rounds: int | None = None) -> list[tuple[str, int, int]]:
    """``(strategy, seed, records logged)`` of the runs without ``rounds + 1`` records (or, when
    ``rounds`` is not known, shorter than the longest run): interrupted, still running, or not of
    this plan. Summaries leave them out, so that every curve and AUBC covers the same label counts."""
    by = curves(records)
    full = rounds + 1 if rounds is not None else max((len(c) for s in by.values() for c in s.values()), default=0)
    return sorted((name, seed, len(c)) for name, s in by.items() for seed, c in s.items() if len(c) != full)


def _runs_logged(runs: list[tuple[str, int, int]]) -> str:
    return ", ".join(f"{name} seed {seed}, {done} rounds logged" for name, seed, done in runs)


def summarize(records: list[dict], rounds: int | None = None) -> dict[str, dict]:
    """Per strategy: label counts, mean and std accuracy per round, and AUBC mean/std/per seed,
    over the complete runs (see :func:`incomplete_runs`); strategies without one are left out."""
    summary = {}
    partial = {(name, seed) for name, seed, _ in incomplete_runs(records, rounds)}
    for strategy, runs in curves(records).items():
        by_seed = {seed: c for seed, c in runs.items() if (strategy, seed) not in partial}
        if not by_seed:
            continue
        acc = np.array([[a for _, a in c] for c in by_seed.values()])
        n = np.array([n for n, _ in next(iter(by_seed.values()))])
        per_seed = {seed: aubc(n, acc[i]) for i, seed in enumerate(by_seed)}
        values = np.array(list(per_seed.values()))
        summary[strategy] = {
            "n_labeled": n,
            "mean": acc.mean(0),
            "std": acc.std(0),
            "aubc_mean": float(values.mean()),
            "aubc_std": float(values.std()),
            "aubc_per_seed": per_seed,
            "seeds": len(by_seed),
        }
    return summary


def table(records: list[dict], rounds: int | None = None) -> str:
    """A text table: mean ± std test accuracy per round and strategy, then AUBC, then the
    paired AUBC difference against ``random`` when it was run."""
    s = summarize(records, rounds)
    if not s:
        return f"no run has finished yet ({_runs_logged(incomplete_runs(records, rounds))})"
    names = sorted(s)
    n_rows = max(len(v["n_labeled"]) for v in s.values())
    ref = next(iter(s.values()))["n_labeled"]
    width = max(16, *(len(n) + 2 for n in names))
    lines = ["round  labels" + "".join(f"{n:>{width}}" for n in names)]
    for i in range(n_rows):
        cells = "".join(
            f"{v['mean'][i]:>{width - 8}.3f} ± {v['std'][i]:.3f}" if i < len(v["mean"]) else " " * width
            for v in (s[n] for n in names)
        )
        lines.append(f"{i:>5}  {int(ref[i]) if i < len(ref) else '':>6}{cells}")
    lines.append("AUBC         " + "".join(f"{s[n]['aubc_mean']:>{width - 8}.3f} ± {s[n]['aubc_std']:.3f}" for n in names))
    if "random" in s:
        base = s["random"]["aubc_per_seed"]
        cells = []
        for n in names:
            diffs = [v - base[k] for k, v in s[n]["aubc_per_seed"].items() if k in base]
            cells.append(f"{np.mean(diffs):>+{width - 8}.3f} ± {np.std(diffs):.3f}" if diffs else " " * width)
        lines.append("vs random    " + "".join(cells))
    seeds = {frozenset(v["aubc_per_seed"]) for v in s.values()}
    if len(seeds) == 1:
        lines.append(f"(test accuracy, mean ± std over {len(next(iter(seeds)))} seeds; AUBC normalized to [0, 1])")
    else:  # some strategies finished other seeds than others
        lines.append("seeds        " + "".join(f"{s[n]['seeds']:>{width}}" for n in names))
        lines.append("(test accuracy, mean ± std over each strategy's finished seeds, counted in the row 'seeds'; "
                     "'vs random' pairs the seeds both finished; AUBC normalized to [0, 1])")
    partial = incomplete_runs(records, rounds)
    if partial:
        lines.append(f"(left out, unfinished or of another plan: {_runs_logged(partial)})")
    return "\n".join(lines)


def plot(records: list[dict], path: str | Path, title: str = "", rounds: int | None = None) -> Path:
    """Write a learning-curve PNG: one line per strategy, a band of ± one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, v in sorted(summarize(records, rounds).items()):
        ax.plot(v["n_labeled"], v["mean"], marker="o", ms=3, label=f"{name} (AUBC {v['aubc_mean']:.3f})")
        ax.fill_between(v["n_labeled"], v["mean"] - v["std"], v["mean"] + v["std"], alpha=0.2)
    ax.set_xlabel("labeled samples")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "learning curves (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
