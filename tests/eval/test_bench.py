"""The benchmark runner: results, a self-contained report, and resuming a killed run with the same numbers."""

import json

import pytest

from fixative.cli import main
from fixative.core.errors import FixativeError
from fixative.eval.bench import bench

CONFIG = """
[experiment]
name = "tiny guidance"
kind = "guidance"
seed = 0

[guidance]
scales = [1, 4]
samples_per_prompt = 1
steps = 2
artists = ["kovra", "tazu"]
subjects = ["house", "cat"]
features = "clip:toy"
"""


@pytest.fixture
def config(tmp_path, shipped, monkeypatch):
    monkeypatch.setenv("FIXATIVE_HOME", str(tmp_path / "home"))  # the data set is repainted here
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG)
    return path


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_same_numbers(config, tmp_path, monkeypatch, capsys):
    whole = bench(config, tmp_path / "whole", log=lambda _: None)
    rows = whole["figures"]["rows"]
    assert [r["guidance"] for r in rows] == [1.0, 4.0] and all(r["images"] == 4 for r in rows)
    html = (tmp_path / "whole" / "report.html").read_text()
    assert "data:image/png;base64," in html and "src=\"http" not in html  # self-contained
    assert "| guidance | FID |" in (tmp_path / "whole" / "report.md").read_text()

    from fixative.eval import fid as fid_module  # the runner imports fid when it runs: patch it at its source

    calls = {"n": 0}
    original = fid_module.fid

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second scale's metrics stage
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(fid_module, "fid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench(config, tmp_path / "killed", log=lambda _: None)
    monkeypatch.setattr(fid_module, "fid", original)
    assert main(["bench", str(config), "--out", str(tmp_path / "killed"), "--quiet", "--device", "cpu"]) == 0
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert resumed["figures"]["rows"] == json.loads(json.dumps(rows))
    assert resumed["stages"]["generate-g1"] == "cached" and resumed["stages"]["metrics-g1"] == "cached"
    assert resumed["stages"]["metrics-g4"] != "cached"
    assert resumed["versions"]["torch"] and resumed["config"]["guidance"]["scales"] == [1, 4]


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(FixativeError, match="not found"):
        bench(tmp_path / "missing.toml", tmp_path / "run")
    (tmp_path / "bad.toml").write_text("[experiment]\nkind = 'speed'\n")
    with pytest.raises(FixativeError, match="kind must be one of guidance, protection"):
        bench(tmp_path / "bad.toml", tmp_path / "run")
