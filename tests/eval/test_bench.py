"""The benchmark runner: results, a self-contained report, and resuming a killed run with the same numbers."""

import json
import time

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
    assert "data:image/png;base64," in html and 'src="http' not in html  # self-contained
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


PROTECTION = """
[experiment]
kind = "protection"
seed = 0

[protection]
artists = ["zenji"]
images = 4
prior_per_artist = 1
cells = ["clean", "glaze:psnr=30:steps=2"]
adversaries = ["none", "jpeg:75"]

[protection.mimic]
method = "lora"
steps = 2
batch_size = 2
prior_batch_size = 2
samples_per_prompt = 1
num_inference_steps = 2
reference_steps = 3
check_per_prompt = 1
"""


@pytest.mark.slow
def test_protection_runs_every_cell(tmp_path, shipped, monkeypatch):
    """Mechanics only (2 cloak steps, 2 fine-tuning steps): one row per (cloak, adversary) with an interval."""
    monkeypatch.setenv("FIXATIVE_HOME", str(tmp_path / "home"))
    (tmp_path / "protection.toml").write_text(PROTECTION)
    results = bench(tmp_path / "protection.toml", tmp_path / "run", log=lambda _: None)
    rows = results["figures"]["rows"]
    assert [(r["cell"], r["adversary"]) for r in rows] == [
        ("clean", "none"),
        ("clean", "jpeg:75"),
        ("glaze:psnr=30:steps=2", "none"),
        ("glaze:psnr=30:steps=2", "jpeg:75"),
    ]
    for row in rows:
        low, high = row["protection_interval"]
        assert row["generations"] == 8 and low <= row["protection_rate"] <= high
        check = row["sampler_check"]  # every cell: its generations against the reference sampler's, paired
        assert check["reference"]["num_inference_steps"] == 3 and check["generations"] == 8
    assert rows[2]["psnr"] >= 30 - 1e-6  # the cloak's budget holds
    assert "| ddim-3 " in (tmp_path / "run" / "report.md").read_text()  # the check's column
    assert "protection against budget" in (tmp_path / "run" / "report.html").read_text()


def test_compare_shows_changed_settings_and_figures(tmp_path, capsys):
    for name, scale_fid, torch_version in (("a", 2.0, "2.14.1"), ("b", 1.5, "2.15.0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps(
                {
                    "config": {"experiment": {"kind": "guidance"}, "guidance": {"steps": 25}},
                    "versions": {"torch": torch_version},
                    "figures": {"rows": [{"guidance": 5.0, "fid": scale_fid, "clip_score": 30.0}]},
                }
            )
        )
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "versions.torch: '2.14.1' -> '2.15.0'" in out and "guidance 5: fid 2 -> 1.5 (-0.5)" in out
    assert main(["bench", "compare", str(tmp_path / "a")]) == 2


def test_each_stage_logs_its_place_the_time_so_far_and_an_eta(tmp_path):
    from fixative.eval.bench import Stages

    now = {"t": 1000.0}
    lines = []
    stages = Stages(tmp_path / "stages", lines.append, clock=lambda: now["t"])
    stages.expect(["cloak-a", "mimic-a-x", "mimic-a-y", "cloak-b", "mimic-b-x"])

    def taking(seconds):
        def compute():
            now["t"] += seconds
            return {"value": seconds}

        return compute

    assert stages.eta() is None
    stages.run("cloak-a", {}, taking(10))
    assert lines[-1] == "[1/5] stage cloak-a: 10 s (elapsed 10 s, ETA 40 s)"  # 4 to come x the mean 10 s
    stages.run("mimic-a-x", {}, taking(60))
    # per kind: 1 cloak x 10 s + 2 mimics x 60 s
    assert lines[-1] == "[2/5] stage mimic-a-x: 1 min 00 s (elapsed 1 min 10 s, ETA 2 min 10 s)"
    resumed = []
    again = Stages(tmp_path / "stages", resumed.append, clock=lambda: now["t"])
    again.expect(["cloak-a", "mimic-a-x", "mimic-a-y"])
    assert again.run("cloak-a", {}, taking(10))[0] == {"value": 10}
    assert resumed == ["[1/3] stage cloak-a: cached (elapsed 0 s, ETA unknown)"]  # cached: no time, no ETA yet
    again.unexpect("mimic")
    assert again.total == 2 and again.planned == {"cloak": 0, "mimic": 1}


LCM_PROTECTION = """
[experiment]
kind = "protection"
seed = 0

[protection]
artists = ["zenji"]
images = 4
prior_per_artist = 1

[[protection.grid]]
cells = ["clean", "photoguard:psnr=30:steps=2"]
adversaries = ["none"]

[[protection.grid]]
cells = ["best:psnr=30:steps=2"]
adversaries = ["jpeg:75"]

[protection.mimic]
method = "lora"
steps = 2
batch_size = 2
prior_batch_size = 2
samples_per_prompt = 1
num_inference_steps = 2
reference_steps = 2
sampler = "lcm"
lcm_steps = 1
"""


@pytest.mark.slow
def test_an_artist_whose_lcm_check_fails_falls_back_to_ddim(tmp_path, shipped, monkeypatch):
    """Mechanics only: the clean control is sampled with LCM and DDIM; a disagreement (forced here) makes the
    artist's cells sample with DDIM, and the report says so; a 'best' grid runs the best method of the grid before."""
    from fixative.eval import mimicry

    monkeypatch.setenv("FIXATIVE_HOME", str(tmp_path / "home"))
    checked = []

    def disagree(distilled, reference):
        checked.append((distilled["trials"], reference["trials"]))
        return False

    monkeypatch.setattr(mimicry, "shares_agree", disagree)
    (tmp_path / "lcm.toml").write_text(LCM_PROTECTION)
    lines = []
    results = bench(tmp_path / "lcm.toml", tmp_path / "run", log=lines.append)
    figures = results["figures"]
    assert set(checked) == {(8, 8)} and figures["sampler_checks"][0]["artist"] == "zenji"
    assert figures["samplers"]["zenji"]["scheduler"] == "ddim"
    rows = figures["rows"]
    assert [(r["cell"], r["adversary"]) for r in rows] == [
        ("clean", "none"),
        ("photoguard:psnr=30:steps=2", "none"),
        ("photoguard:psnr=30:steps=2", "jpeg:75"),
    ]
    assert (
        all(r["sampler"]["scheduler"] == "ddim" for r in rows) and rows[2]["cell_as_written"] == "best:psnr=30:steps=2"
    )
    report = (tmp_path / "run" / "report.md").read_text()
    assert "fall back to DDIM" in report and "| ddim-25 |" not in report and "| ddim-2 |" in report
    # 7 announced (3 cloaks, 4 mimics); the best cell reused the cloak of the grid before
    assert any(line.startswith("[6/6] stage mimic-zenji-photoguard:psnr=30:steps=2-jpeg:75") for line in lines)


@pytest.mark.slow
def test_artists_run_in_parallel_processes_then_the_report_comes_from_their_stages(tmp_path, shipped, monkeypatch):
    monkeypatch.setenv("FIXATIVE_HOME", str(tmp_path / "home"))
    config = PROTECTION.replace('artists = ["zenji"]', 'artists = ["zenji", "tovik"]')
    config = config.replace('cells = ["clean", "glaze:psnr=30:steps=2"]', 'cells = ["clean"]')
    config = config.replace('adversaries = ["none", "jpeg:75"]', 'adversaries = ["none"]')
    (tmp_path / "two.toml").write_text(config)
    lines = []
    started = time.time()
    results = bench(tmp_path / "two.toml", tmp_path / "run", log=lines.append, jobs=2)
    elapsed = time.time() - started
    assert [(r["artist"], r["cell"]) for r in results["figures"]["rows"]] == [("zenji", "clean"), ("tovik", "clean")]
    assert set(results["stages"].values()) == {"cached"}  # every stage was computed by the artists' processes
    # the run's seconds include the artists' processes, not only the report assembled from their cached stages
    assert results["seconds"] > 0.9 * elapsed
    assert any(line.startswith("[zenji] [2/2] stage mimic-zenji-clean-none") for line in lines)
    assert any(line.startswith("[tovik] ") for line in lines)
