"""Simulated-oracle experiments from TOML configs, logged as JSON Lines per round."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dynal.data import load_dataset
from dynal.loop import ActiveLearner, check_model
from dynal.models import model_factory
from dynal.strategies import make_strategy
from dynal.training import TrainConfig, build_model
from dynal.validation import check_field_types

RESULTS = "results.jsonl"
_RECORD_KEYS = ("strategy", "seed", "round", "n_labeled", "test_accuracy")  # what reports read


@dataclass(frozen=True)
class StrategySpec:
    """A strategy in a config: registry name, parameters and the label it is reported under."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        check_field_types(self)
        make_strategy(self.name, **self.params)  # validate now
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @classmethod
    def parse(cls, item: str | dict[str, Any]) -> StrategySpec:
        if isinstance(item, str):
            return cls(item)
        if not isinstance(item, dict):
            raise TypeError(f"a strategy is a name or a table, got {item!r}")
        item = dict(item)
        if "name" not in item:
            raise ValueError(f"a strategy table needs a 'name': {item}")
        return cls(item.pop("name"), label=item.pop("label", ""), params=item)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The table of a TOML file; a clear error when it is not valid TOML."""
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from None


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every strategy runs for every seed from the same initial set.

    Attributes
    ----------
    dataset : ``{"name": ..., **loader params}``
    model : ``{"name": ..., **model params}``
    strategies : what to compare
    train : :class:`~dynal.training.TrainConfig`
    initial : size of the random initial labeled set (the same for all strategies of a seed)
    budget : ids queried per round
    rounds : number of queries after the initial round
    seeds : one run per seed and strategy
    chunk_size : rows per chunk of the pool scan (forward passes take cache-sized parts of a chunk)
    """

    dataset: dict[str, Any]
    model: dict[str, Any]
    strategies: tuple[StrategySpec, ...]
    train: TrainConfig = TrainConfig()
    initial: int = 20
    budget: int = 20
    rounds: int = 10
    seeds: tuple[int, ...] = (0,)
    chunk_size: int = 1024
    name: str = "experiment"

    def __post_init__(self) -> None:
        check_field_types(self)
        for key, section in (("dataset", self.dataset), ("model", self.model)):
            if not isinstance(section, dict):
                raise TypeError(f"[{key}] must be a table, got {section!r}")
            if "name" not in section:
                raise ValueError(f"[{key}] needs a 'name'")
        if not self.strategies:
            raise ValueError("the config names no strategies")
        labels = [s.label for s in self.strategies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"strategy labels must be distinct, got {labels}: give each variant a 'label'")
        if self.initial < 1 or self.budget < 1 or self.rounds < 0 or self.chunk_size < 1:
            raise ValueError("initial, budget and chunk_size must be >= 1 and rounds >= 0")
        if not self.seeds:
            raise ValueError("the config names no seeds")
        if len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct integers >= 0, got {list(self.seeds)}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        """Build from a parsed TOML table, rejecting unknown keys."""
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        for key in ("dataset", "model", "strategies"):
            if key not in raw:
                raise ValueError(f"the config needs a '{key}' entry")
        train = raw.pop("train", {})
        if not isinstance(train, dict):
            raise TypeError(f"[train] must be a table, got {train!r}")
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        if set(train) - train_keys:
            raise ValueError(f"unknown [train] keys {sorted(set(train) - train_keys)}; known: {sorted(train_keys)}")
        if not isinstance(raw["strategies"], list):
            raise TypeError(f"strategies must be a list of names or tables, got {raw['strategies']!r}")
        raw["strategies"] = tuple(StrategySpec.parse(s) for s in raw["strategies"])
        seeds = raw.get("seeds", [0])
        if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise TypeError(f"seeds must be a list of integers, got {seeds!r}")
        raw["seeds"] = tuple(seeds)
        return cls(train=TrainConfig(**train), **raw)

    @classmethod
    def from_toml(cls, path: str | Path) -> ExperimentConfig:
        return cls.from_dict(read_toml(path))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["strategies"] = [{"name": s.name, "label": s.label, **s.params} for s in self.strategies]
        return out


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results file. A last line cut short by a crash (an interrupted write)
    is dropped; a broken line anywhere else is an error naming it."""
    lines = path.read_text().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # after the last newline: a record whose write was cut short
                break
            raise ValueError(f"{path}, line {i + 1}, is not a JSON record: {line[:80]!r}") from None
        missing = [k for k in _RECORD_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"{path}, line {i + 1}, is not a round record: it lacks {missing}")
        records.append(record)
    return records


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _completed_runs(path: Path, rounds: int) -> set[tuple[str, int]]:
    """Keep only the records of complete (strategy, seed) runs; return which those are."""
    if not path.exists():
        return set()
    records = read_results(path)
    counts: dict[tuple[str, int], int] = {}
    for r in records:
        counts[(r["strategy"], r["seed"])] = counts.get((r["strategy"], r["seed"]), 0) + 1
    done = {key for key, n in counts.items() if n == rounds + 1}
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in records if (r["strategy"], r["seed"]) in done))
    return done


def run_experiment(config: ExperimentConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Run every (strategy, seed) of ``config`` with a simulated oracle; return the results file.

    Each round appends one JSON record to ``out_dir/results.jsonl`` as soon as it is done.
    Re-running on the same directory resumes: complete runs are kept, partial ones redone
    (runs are deterministic, so the result is the same as an uninterrupted run).
    """
    out = Path(out_dir)
    config_path = out / "config.json"
    if config_path.exists():
        try:
            stored = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{config_path} is unreadable; choose another directory") from None
        if stored != json.loads(json.dumps(config.to_dict())):
            raise ValueError(f"{out} holds a run of a different config; choose another directory")

    # everything that can be checked before the first round is, before the directory is claimed
    data = load_dataset(**config.dataset)
    needed = config.initial + config.rounds * config.budget
    if needed > len(data.train):
        raise ValueError(f"initial + rounds x budget = {needed} exceeds the pool of {len(data.train)}")
    model_params = {k: v for k, v in config.model.items() if k != "name"}
    factory = model_factory(config.model["name"], data.input_shape, data.n_classes, **model_params)
    model = build_model(factory, np.random.default_rng(0))  # a trial model; torch's generator is left alone
    for spec in config.strategies:
        check_model(model, data.n_classes, make_strategy(spec.name, **spec.params))

    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(config_path, json.dumps(config.to_dict(), indent=2))
    results = out / RESULTS
    done = _completed_runs(results, config.rounds)
    todo = [(seed, spec) for seed in config.seeds for spec in config.strategies if (spec.label, seed) not in done]
    bar = tqdm(total=len(todo) * (config.rounds + 1), desc=config.name, unit="round", disable=not progress)
    for seed, spec in todo:
        init_seq, learner_seq = np.random.SeedSequence(seed).spawn(2)
        learner = ActiveLearner(
            data.train,
            factory,
            make_strategy(spec.name, **spec.params),
            data.n_classes,
            config.train,
            np.random.default_rng(learner_seq),
            chunk_size=config.chunk_size,
        )
        picked = learner.initialize(_initial_ids(data.train.ids, config.initial, init_seq))
        query_seconds, peak = 0.0, 0
        for rnd in range(config.rounds + 1):
            if rnd > 0:
                query = learner.query(config.budget)
                learner.update(query.ids)
                picked, query_seconds, peak = query.ids, query.seconds, query.peak_memory
            fitted = learner.fit()
            _append(results, {
                "strategy": spec.label,
                "strategy_config": learner.strategy.config(),
                "seed": seed,
                "round": rnd,
                "n_labeled": len(learner.labeled_ids()),
                "test_accuracy": learner.evaluate(data.test.X, data.test.y),
                "train_loss": fitted.final_loss,
                "train_seconds": fitted.seconds,
                "query_seconds": query_seconds,
                "query_peak_memory": peak,
                "picked_ids": picked.tolist(),
            })
            bar.update()
    bar.close()
    return results


def _initial_ids(ids: np.ndarray, n: int, seq: np.random.SeedSequence) -> np.ndarray:
    """The seed's initial set, shared by every strategy so their runs are paired."""
    return np.sort(np.random.default_rng(seq).choice(ids, size=n, replace=False))
