import json

import numpy as np
import pytest

from dynal import ExperimentConfig, run_experiment
from dynal.report import aubc, load_records, planned_rounds, plot, summarize, table

TIMINGS = {"train_seconds", "query_seconds", "query_peak_memory"}


def _config(dataset, **over):
    raw = {
        "name": "t",
        "dataset": dataset,
        "model": {"name": "mlp", "hidden": [8]},
        "strategies": ["random", {"name": "dynamical", "train_term": 0.0, "label": "gradlen"}],
        "train": {"epochs": 2, "batch_size": 16},
        "initial": 6,
        "budget": 5,
        "rounds": 2,
        "seeds": [0, 1],
        **over,
    }
    return ExperimentConfig.from_dict(raw)


BLOBS = {"name": "blobs", "n": 150, "d": 4, "k": 3, "seed": 2}


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def test_records_per_round_and_same_seed_reproduces(tmp_path):
    cfg = _config(BLOBS)
    a = load_records(run_experiment(cfg, tmp_path / "a", progress=False))
    b = load_records(run_experiment(cfg, tmp_path / "b", progress=False))
    assert _strip(a) == _strip(b)
    assert len(a) == 2 * 2 * 3
    for r in a:
        assert r["n_labeled"] == 6 + 5 * r["round"]
        assert len(r["picked_ids"]) == (6 if r["round"] == 0 else 5)
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert TIMINGS <= set(r)
    # strategies of one seed start from the same initial set and model
    first = {(r["strategy"], r["seed"]): r for r in a if r["round"] == 0}
    assert first[("random", 0)]["picked_ids"] == first[("gradlen", 0)]["picked_ids"]
    assert first[("random", 0)]["test_accuracy"] == first[("gradlen", 0)]["test_accuracy"]
    assert first[("random", 0)]["picked_ids"] != first[("random", 1)]["picked_ids"]


def test_the_test_split_never_influences_training(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 4)), np.arange(120) % 3
    X_test = rng.normal(size=(30, 4))
    np.savez(tmp_path / "a.npz", X=X, y=y, X_test=X_test, y_test=np.arange(30) % 3)
    np.savez(tmp_path / "b.npz", X=X, y=y, X_test=X_test * 5 + 1, y_test=rng.permutation(np.arange(30) % 3))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMINGS | {"test_accuracy"}} for r in rs]  # noqa: E731
    ra = load_records(run_experiment(_config({"name": str(tmp_path / "a.npz")}), tmp_path / "ra", progress=False))
    rb = load_records(run_experiment(_config({"name": str(tmp_path / "b.npz")}), tmp_path / "rb", progress=False))
    assert strip(ra) == strip(rb)
    assert [r["test_accuracy"] for r in ra] != [r["test_accuracy"] for r in rb]


def test_interrupted_run_resumes_to_the_same_records(tmp_path):
    cfg = _config(BLOBS)
    full = load_records(run_experiment(cfg, tmp_path / "full", progress=False))
    part = tmp_path / "part"
    path = run_experiment(cfg, part, progress=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n")  # a crash after 4 rounds
    resumed = load_records(run_experiment(cfg, part, progress=False))
    key = lambda r: (r["strategy"], r["seed"], r["round"])  # noqa: E731
    assert sorted(_strip(resumed), key=key) == sorted(_strip(full), key=key)
    with pytest.raises(ValueError, match="different config"):
        run_experiment(_config(BLOBS, budget=4), part, progress=False)
    # a crash in the middle of writing a record: the cut line is dropped, the run resumes
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    assert len(load_records(part)) == 5  # the report reads it too
    resumed = load_records(run_experiment(cfg, part, progress=False))
    assert sorted(_strip(resumed), key=key) == sorted(_strip(full), key=key)
    path.write_text("\n".join([*lines[:2], lines[2][:40], *lines[3:]]) + "\n")  # damage, not a crash
    with pytest.raises(ValueError, match="line 3, is not a JSON record"):
        run_experiment(cfg, part, progress=False)


def test_config_errors_are_specific(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        _config(BLOBS, bugdet=3)
    with pytest.raises(ValueError, match="unknown strategy"):
        _config(BLOBS, strategies=["randon"])
    with pytest.raises(ValueError, match="distinct"):
        _config(BLOBS, strategies=["random", "random"])
    with pytest.raises(ValueError, match=r"unknown \[train\] keys"):
        _config(BLOBS, train={"epoch": 3})
    for seeds in ([0, 0], [-1]):
        with pytest.raises(ValueError, match="seeds must be distinct integers >= 0"):
            _config(BLOBS, seeds=seeds)
    with pytest.raises(TypeError, match="label must be a str"):
        _config(BLOBS, strategies=[{"name": "random", "label": 7}])
    for key, value, message in [
        ("seeds", "12", "seeds must be a list of integers"),
        ("seeds", [0.9, 1.5], "seeds must be a list of integers"),
        ("budget", 5.0, "budget must be a int"),
        ("initial", "6", "initial must be a int"),
        ("strategies", "random", "strategies must be a list"),
        ("train", {"warm_start": "false"}, "warm_start must be a bool"),
        ("train", {"lr": "0.001"}, "lr must be a number"),
        ("train", {"epochs": 2.5}, "epochs must be a int"),
    ]:
        with pytest.raises(TypeError, match=message):
            _config(BLOBS, **{key: value})
    with pytest.raises(ValueError, match="train_term must be a finite number >= 0, got '2'"):
        _config(BLOBS, strategies=[{"name": "dynamical", "train_term": "2"}])
    # a config that fails before its first round does not claim the directory
    for bad, message in [({"rounds": 100}, "exceeds the pool"), ({"model": {"name": "mlp", "hiden": [8]}}, "hiden"),
                         ({"strategies": ["random", "bald"]}, "dropout")]:
        with pytest.raises((ValueError, TypeError), match=message):
            run_experiment(_config(BLOBS, **bad), tmp_path / "d", progress=False)
        assert not (tmp_path / "d" / "config.json").exists()
    assert len(load_records(run_experiment(_config(BLOBS, seeds=[0]), tmp_path / "d", progress=False))) == 6


def test_toml_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'name = "x"\ninitial = 5\nbudget = 3\nrounds = 1\nseeds = [4]\n'
        '[dataset]\nname = "blobs"\nn = 90\n[model]\nname = "mlp"\nhidden = [4]\n'
        '[train]\nepochs = 1\n[[strategies]]\nname = "margin"\n'
    )
    cfg = ExperimentConfig.from_toml(path)
    assert cfg.seeds == (4,) and cfg.train.epochs == 1 and cfg.strategies[0].name == "margin"


def test_aubc_normalization():
    assert aubc(np.array([10, 20, 30]), np.array([0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert aubc(np.array([0, 10, 30]), np.array([0.0, 1.0, 1.0])) == pytest.approx((5 + 20) / 30)
    assert aubc(np.array([7]), np.array([0.3])) == pytest.approx(0.3)


def test_report_from_records(tmp_path):
    records = []
    for seed, accs in enumerate([[0.2, 0.4], [0.4, 0.6]]):
        for rnd, acc in enumerate(accs):
            for name, shift in (("random", 0.0), ("dynamical", 0.1)):
                records.append({"strategy": name, "seed": seed, "round": rnd, "n_labeled": 10 + 10 * rnd, "test_accuracy": acc + shift})
    s = summarize(records)
    np.testing.assert_allclose(s["random"]["mean"], [0.3, 0.5])
    np.testing.assert_allclose(s["random"]["std"], [0.1, 0.1])
    assert s["dynamical"]["aubc_mean"] == pytest.approx(0.5)
    text = table(records)
    assert "0.400 ± 0.100" in text and "+0.100 ± 0.000" in text
    png = plot(records, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(load_records(tmp_path / "r.jsonl")) == len(records)
    # an unfinished run (random, seed 2, one round so far) is left out and named, so every
    # curve and AUBC covers the same label counts
    records.append({"strategy": "random", "seed": 2, "round": 0, "n_labeled": 10, "test_accuracy": 0.9})
    s = summarize(records)
    np.testing.assert_allclose(s["random"]["mean"], [0.3, 0.5])
    assert s["random"]["seeds"] == 2
    text = table(records)
    assert "+0.100 ± 0.000" in text and "random seed 2, 1 rounds logged" in text
    # with the planned rounds known, a run cut short is found even when no run is longer
    partial = [r for r in records if r["round"] == 0 and r["seed"] == 0]
    assert "random seed 0" not in table(partial) and "no run has finished yet" in table(partial, rounds=1)
    assert summarize(partial, rounds=1) == {}
    assert "random seed 0" in table(records, rounds=0)  # longer than planned: not of this plan either
    # the planned rounds come from a run directory's config.json, never from a stray one
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in partial))
    (run / "config.json").write_text(json.dumps({"rounds": 1}))
    (run / "copy.jsonl").write_text((run / "results.jsonl").read_text())
    assert planned_rounds(run) == planned_rounds(run / "results.jsonl") == 1
    assert planned_rounds(run / "copy.jsonl") is None
    (run / "config.json").write_text(json.dumps({"rounds": True}))
    with pytest.raises(ValueError, match="plans True rounds"):
        planned_rounds(run)
    (run / "results.jsonl").write_text('{"strategy": "random", "seed": 0, "round": 0}\n')
    with pytest.raises(ValueError, match=r"line 1, is not a round record: it lacks \['n_labeled', 'test_accuracy'\]"):
        load_records(run)
