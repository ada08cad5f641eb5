import json
import os

import numpy as np
import pytest

from dynal import ExperimentConfig, run_experiment
from dynal.data import load_dataset
from dynal.experiment import _write_atomic, read_results
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

TINY = {"name": "blobs", "n": 60, "d": 4, "k": 3, "seed": 2}  # 48 pool samples, 12 test


def _cfg(**over):
    """A one-round, one-seed config on TINY, with a labeled strategy."""
    small = {"model": {"name": "mlp", "hidden": [4]}, "strategies": ["random", {"name": "entropy", "label": "ent"}],
             "train": {"epochs": 1, "batch_size": 16}, "budget": 4, "rounds": 1, "seeds": [0]}
    return _config(TINY, **{**small, **over})


def test_rerunning_a_finished_run_adds_nothing(tmp_path):  # X5: completed runs keyed by label
    cfg = _cfg()
    first = load_records(run_experiment(cfg, tmp_path, progress=False))
    again = load_records(run_experiment(cfg, tmp_path, progress=False))
    assert len(first) == 2 * 2 and _strip(again) == _strip(first)


def test_atomic_write_keeps_the_old_file_when_the_rename_never_happens(tmp_path, monkeypatch):  # X3
    path = tmp_path / "config.json"
    path.write_text("old")

    def crash(*args):
        raise OSError("crash before the rename")

    monkeypatch.setattr("dynal.experiment.os.replace", crash)
    with pytest.raises(OSError):
        _write_atomic(path, "new")
    assert path.read_text() == "old"


def test_a_broken_line_ended_by_a_newline_is_damage_not_a_cut_write(tmp_path):  # X4
    good = json.dumps({"strategy": "random", "seed": 0, "round": 0, "n_labeled": 5, "test_accuracy": 0.5})
    path = tmp_path / "results.jsonl"
    path.write_text(good + "\n" + good[:30] + "\n")  # the newline was written: not a crash mid-record
    with pytest.raises(ValueError, match="line 2, is not a JSON record"):
        read_results(path)
    path.write_text(good + "\n" + good[:30])  # cut short: dropped
    assert len(read_results(path)) == 1


def test_an_unreadable_config_json_is_refused(tmp_path):  # X7
    (tmp_path / "config.json").write_text('{"rounds": ')
    with pytest.raises(ValueError, match="config.json is unreadable"):
        run_experiment(_cfg(), tmp_path, progress=False)
    assert not (tmp_path / "results.jsonl").exists()


def test_a_plan_may_use_the_whole_pool_but_not_one_more(tmp_path):  # X8, X9
    pool = len(load_dataset(**TINY).train)
    assert pool == 48
    records = load_records(run_experiment(_cfg(strategies=["random"], initial=8, budget=10, rounds=4), tmp_path / "a", progress=False))
    assert max(r["n_labeled"] for r in records) == pool
    with pytest.raises(ValueError, match="exceeds the pool"):
        run_experiment(_cfg(strategies=["random"], initial=9, budget=10, rounds=4), tmp_path / "b", progress=False)


@pytest.mark.parametrize("key, value", [("budget", 0), ("budget", -3), ("initial", 0), ("rounds", -1), ("chunk_size", 0)])
def test_sizes_are_range_checked(key, value):  # X11
    with pytest.raises(ValueError, match="must be >= 1"):
        _cfg(**{key: value})


def test_config_sections_need_a_name_and_seeds_are_not_bools():  # X12, X13
    with pytest.raises(ValueError, match=r"\[dataset\] needs a 'name'"):
        _config({"n": 60})
    with pytest.raises(ValueError, match=r"\[model\] needs a 'name'"):
        _cfg(model={"hidden": [4]})
    with pytest.raises(TypeError, match="seeds must be a list of integers"):
        _cfg(seeds=[True])


def test_each_record_is_synced_as_its_round_ends(tmp_path, monkeypatch):  # X14 (a spy: durability is not observable otherwise)
    synced = []
    monkeypatch.setattr("dynal.experiment.os.fsync", lambda fd: synced.append(os.fstat(fd).st_size))
    records = load_records(run_experiment(_cfg(strategies=["random"]), tmp_path, progress=False))
    assert len(synced) >= len(records) + 1  # config.json, then every record


N_LAB = [10, 20, 40]  # uneven steps: the x-axis matters
ACC = {("random", 0): [0.2, 0.5, 0.6], ("random", 1): [0.4, 0.5, 0.9], ("random", 2): [0.3, 0.4, 0.5],
       ("margin", 0): [0.2, 0.7, 0.8], ("margin", 1): [0.4, 0.5, 0.7], ("margin", 2): [0.3, 0.6, 0.9]}


def _records(shuffle=False):
    out = [{"strategy": s, "seed": seed, "round": i, "n_labeled": n, "test_accuracy": a}
           for (s, seed), accs in ACC.items() for i, (n, a) in enumerate(zip(N_LAB, accs))]
    if shuffle:
        out = [out[i] for i in np.random.default_rng(3).permutation(len(out))]
    return out


def _ref_aubc(accs):
    return np.trapezoid(accs, N_LAB) / (N_LAB[-1] - N_LAB[0])


def test_aubc_std_and_vs_random_are_population_statistics_over_seeds():  # R3, R6
    s = summarize(_records())
    for name in ("random", "margin"):
        per = [_ref_aubc(ACC[(name, seed)]) for seed in range(3)]
        assert s[name]["aubc_mean"] == pytest.approx(np.mean(per))
        assert s[name]["aubc_std"] == pytest.approx(np.std(per))  # ddof=0, as the accuracy std
    diffs = [_ref_aubc(ACC[("margin", k)]) - _ref_aubc(ACC[("random", k)]) for k in range(3)]
    line = next(x for x in table(_records()).splitlines() if x.startswith("vs random"))
    assert f"{np.mean(diffs):+.3f} ± {np.std(diffs):.3f}" in line
    assert np.std(diffs) > 0.01 and np.std(diffs, ddof=1) - np.std(diffs) > 0.002  # distinguishable


def test_a_table_of_strategies_with_different_finished_seeds_counts_them():
    records = [r for r in _records() if not (r["strategy"] == "margin" and r["seed"] > 0)]
    lines = table(records).splitlines()
    assert lines[-2].split() == ["seeds", "1", "3"]  # margin, random
    assert "each strategy's finished seeds" in lines[-1] and "over 3 seeds" not in lines[-1]
    assert "over 3 seeds" in table(_records()).splitlines()[-1]


def test_table_rows_show_each_rounds_label_count():  # R7
    rows = table(_records()).splitlines()[1:4]
    for i, (row, n) in enumerate(zip(rows, N_LAB)):
        assert row.split()[:2] == [str(i), str(n)]


def test_records_in_any_order_give_the_same_summary():  # R9
    a, b = summarize(_records()), summarize(_records(shuffle=True))
    for name in a:
        np.testing.assert_allclose(a[name]["mean"], b[name]["mean"])
        assert a[name]["aubc_mean"] == pytest.approx(b[name]["aubc_mean"])


def test_planned_rounds_must_be_a_count(tmp_path):  # R8
    (tmp_path / "config.json").write_text(json.dumps({"rounds": -1}))
    with pytest.raises(ValueError, match="not a count"):
        planned_rounds(tmp_path)
