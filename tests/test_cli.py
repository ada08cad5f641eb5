import json

from typer.testing import CliRunner

from dynal.cli import app

runner = CliRunner()


def test_demo_end_to_end_reduced(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--seeds", "1", "--rounds", "1", "--epochs", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    for name in ("dynamical", "random", "entropy", "margin", "AUBC"):
        assert name in result.output
    assert (out / "learning_curve.png").exists() and (out / "results.jsonl").exists()
    again = runner.invoke(app, ["report", str(out)])
    assert again.exit_code == 0 and "AUBC" in again.output


def test_run_and_list(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'name = "c"\ninitial = 4\nbudget = 2\nrounds = 1\n[dataset]\nname = "blobs"\nn = 60\n'
        '[model]\nname = "mlp"\nhidden = [4]\n[train]\nepochs = 1\n[[strategies]]\nname = "entropy"\n'
    )
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "entropy" in result.output
    listing = runner.invoke(app, ["list"])
    assert "dynamical" in listing.output and "fashion-mnist" in listing.output


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("name = \n")
    wrong_value = tmp_path / "wd.toml"
    wrong_value.write_text(
        'initial = 4\nbudget = 2\nrounds = 1\n[dataset]\nname = "blobs"\nn = 60\n'
        '[model]\nname = "mlp"\n[train]\nweight_decay = -1.0\n[[strategies]]\nname = "entropy"\n'
    )
    for args, message in [
        (["run", str(bad_toml)], "bad.toml is not valid TOML"),
        (["run", str(wrong_value), "--out", str(tmp_path / "o")], "weight_decay must be a finite number >= 0"),
        (["report", str(tmp_path)], "no results at"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output and "DYNAL_DEBUG=1" in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    debug = runner.invoke(app, ["run", str(bad_toml)], env={"DYNAL_DEBUG": "1"})
    assert isinstance(debug.exception, ValueError)  # with its traceback


CFG = ('name = "c"\ninitial = 4\nbudget = 2\nrounds = 1\n[dataset]\nname = "blobs"\nn = 60\n'
       '[model]\nname = "mlp"\nhidden = [4]\n[train]\nepochs = 1\n[[strategies]]\nname = "random"\n')


def test_run_writes_to_out_and_report_takes_a_results_file(tmp_path, monkeypatch):  # C3, C4
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text(CFG)
    out = tmp_path / "elsewhere"
    assert runner.invoke(app, ["run", "c.toml", "--out", str(out), "--no-progress"]).exit_code == 0
    assert (out / "results.jsonl").exists() and not (tmp_path / "runs").exists()
    (out / "learning_curve.png").unlink()
    result = runner.invoke(app, ["report", str(out / "results.jsonl")])
    assert result.exit_code == 0, result.output
    assert (out / "learning_curve.png").exists()


def test_report_judges_completeness_by_the_planned_rounds(tmp_path):  # C5
    (tmp_path / "config.json").write_text(json.dumps({"rounds": 2}))
    rows = [{"strategy": "random", "seed": 0, "round": i, "n_labeled": 4 + 2 * i, "test_accuracy": 0.5} for i in range(2)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0 and "no run has finished yet" in result.output, result.output


def test_type_errors_and_option_ranges_exit_as_documented(tmp_path):  # C2, C6, C7
    (tmp_path / "t.toml").write_text(CFG.replace("budget = 2", "budget = 2.0"))
    result = runner.invoke(app, ["run", str(tmp_path / "t.toml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "budget must be a int" in result.stderr and "Traceback" not in result.output
    assert "error:" not in result.stdout  # errors go to stderr
    assert runner.invoke(app, ["demo", "--seeds", "0", "--out", str(tmp_path / "d")]).exit_code == 2
