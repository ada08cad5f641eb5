"""The ``dynal`` command."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Optional

import typer

from dynal.experiment import ExperimentConfig, read_toml, run_experiment
from dynal.report import load_records, planned_rounds, plot, table

app = typer.Typer(help="Deep active learning with dynamicAL and its baselines.", no_args_is_help=True, add_completion=False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Show a mistake in the input (a bad config or file, a path that cannot be written) as one
    line on stderr and exit with status 1, instead of a traceback; with ``DYNAL_DEBUG=1`` in
    the environment the error propagates with its traceback."""
    try:
        yield
    except (ValueError, TypeError, OSError) as err:
        if os.environ.get("DYNAL_DEBUG") == "1":
            raise
        typer.echo(f"error: {err} (DYNAL_DEBUG=1 shows the traceback)", err=True)
        raise typer.Exit(1) from None


def _run_and_report(config: ExperimentConfig, out: Path, progress: bool) -> None:
    results = run_experiment(config, out, progress=progress)
    records = load_records(results)
    typer.echo(table(records, config.rounds))
    png = plot(records, out / "learning_curve.png", title=f"{config.name}: {config.dataset['name']}, {config.model['name']}", rounds=config.rounds)
    typer.echo(f"results: {results}\nplot: {png}")


def demo_config() -> ExperimentConfig:
    """The demo's config, shipped with the package."""
    with resources.files("dynal").joinpath("configs/demo.toml").open("rb") as f:
        import tomllib

        return ExperimentConfig.from_dict(tomllib.load(f))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Number of seeds (default: the config's 3)."),
    rounds: Optional[int] = typer.Option(None, min=0, help="Query rounds (default: the config's 10)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs per round (default: the config's)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """dynamicAL vs random, entropy and margin on digits with an MLP; prints the table, writes the plot."""
    config = demo_config()
    changes: dict = {}
    if seeds is not None:
        changes["seeds"] = tuple(range(seeds))
    if rounds is not None:
        changes["rounds"] = rounds
    if epochs is not None:
        changes["train"] = dataclasses.replace(config.train, epochs=epochs)
    with _user_errors():
        _run_and_report(dataclasses.replace(config, **changes), out, progress)


@app.command()
def run(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Experiment config (TOML)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<config name>)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run a simulated-oracle experiment from a TOML config (resumes an interrupted run)."""
    with _user_errors():
        cfg = ExperimentConfig.from_toml(config)
        _run_and_report(cfg, out or Path("runs") / cfg.name, progress)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., exists=True, help="Run directory or results.jsonl."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Where to write the learning-curve PNG."),
) -> None:
    """Print the accuracy/AUBC table of a run and write its learning-curve plot."""
    with _user_errors():
        records, rounds = load_records(run_dir), planned_rounds(run_dir)
        typer.echo(table(records, rounds))
        base = run_dir if run_dir.is_dir() else run_dir.parent
        typer.echo(f"plot: {plot(records, plot_path or base / 'learning_curve.png', rounds=rounds)}")


@app.command("approx-ratio")
def approx_ratio(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Experiment config (TOML): data, model, training, rounds; no strategies needed."),
    budgets: str = typer.Option("1,5,10,20,50", help="Comma-separated query sizes b for the whole pool."),
    tiny_pool: int = typer.Option(16, min=2, max=20, help="Sub-pool size for the exhaustive optimum (<= 20)."),
    tiny_budgets: str = typer.Option("2,3,4", help="Comma-separated b (<= 4) for the exhaustive optimum; empty to skip."),
    seed: Optional[int] = typer.Option(None, min=0, help="Seed (default: the config's first)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """The paper's RQ2: G(S + top-b) against greedy and the exhaustive optimum, per round and b.

    Each round labels with dynamical (top-b, last layer); the config's strategies are not used."""
    from dynal.approximation import approximation_study, ratio_table, unused_strategies

    def ints(text: str, option: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None
        if any(v < 1 for v in values):
            raise typer.BadParameter(f"query sizes must be positive, got {text!r}", param_hint=option)
        return values

    budget_list, tiny_list = ints(budgets, "--budgets"), ints(tiny_budgets, "--tiny-budgets")
    with _user_errors():
        raw = read_toml(config)
        unused = unused_strategies(raw.pop("strategies", []))
        cfg = ExperimentConfig.from_dict({**raw, "strategies": ["dynamical"]})
        if unused:
            typer.echo(f"note: approx-ratio labels with dynamical's defaults; the config's strategies {unused} are not used", err=True)
        records = approximation_study(cfg, budget_list, tiny_pool, tiny_list, seed, progress)
        typer.echo(ratio_table(records))


@app.command("list")
def list_names() -> None:
    """List the builtin datasets, models and strategies."""
    from dynal.data import DATASETS
    from dynal.models import MODELS
    from dynal.strategies import STRATEGIES

    typer.echo(f"datasets:   {', '.join(sorted(DATASETS))} (or a .npz/.npy path)")
    typer.echo(f"models:     {', '.join(sorted(MODELS))}")
    typer.echo(f"strategies: {', '.join(sorted(STRATEGIES))}")
