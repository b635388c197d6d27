"""The report's measurements, on a `ci` build (seconds), and its helpers on known inputs."""

import json
import math

import pytest
import torch

from fixative.core.toy.report import ReportConfig, psnr_db, report


def test_psnr_of_a_known_error():
    reference = torch.zeros(2, 3, 8, 8)
    test = reference + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    assert torch.allclose(psnr_db(reference, test), torch.tensor([20.0, 20.0]), atol=1e-4)


@pytest.mark.slow
def test_report_runs_every_part_on_a_ci_build(ci_build, tmp_path):
    folder = ci_build
    config = ReportConfig(num_inference_steps=2, samples_per_prompt=1, mimic_artists=("zenji",), mimic_images=4,
                          mimic_steps=2, mimic_batch=2, mimic_prior_batch=2, mimic_samples_per_subject=1,
                          classifier_steps=2)
    lines = []
    figures = report(folder, tmp_path / "report", config, log=lines.append)
    for key in ("vae_attribution", "vae_psnr_db"):
        assert math.isfinite(figures["vae"][key])
    assert 0 <= figures["clip"]["clip_artist_accuracy"] <= 1
    assert figures["generation"]["images"] == 8 * 8
    mimicry = figures["mimicry"]["zenji"]
    assert mimicry["name"] == "nabu" and 0 <= mimicry["mimic_attribution"] <= 1
    assert sum(mimicry["attributed_to"].values()) == 8
    assert 0 <= figures["generation"]["generation_subject"] <= 1 and 0 <= mimicry["mimic_subject"] <= 1
    assert (tmp_path / "report" / "samples.png").is_file()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["targets"]["vae_psnr_db"] == 22.0
    assert any("target >= 90%" in line for line in lines)


@pytest.fixture
def home(monkeypatch, tmp_path):
    """The shipped toy world's data set is repainted under tmp_path, not the user's FIXATIVE_HOME."""
    monkeypatch.setenv("FIXATIVE_HOME", str(tmp_path / "home"))


# The shipped build as `fixative toy report` measured it (2026-11-30): VAE 26.4 dB, reconstructions and CLIP
# zero-shot 100%, generation attribution 100% (subjects 99.2%), mimicry 100% for both held-out artists with the
# trained artists kept at 93.8% / 98.4%. These tests re-measure with fewer samples.


@pytest.mark.slow
def test_shipped_toy_world_meets_the_vae_and_clip_targets(tmp_path, shipped, home):
    from fixative.core.toy.report import TARGETS

    config = ReportConfig(classifier_steps=150)
    figures = report(shipped, tmp_path / "report", config, parts=("vae", "clip"), log=lambda _: None)
    assert figures["vae"]["vae_psnr_db"] >= TARGETS["vae_psnr_db"]
    assert figures["vae"]["vae_attribution"] >= TARGETS["vae_attribution"]
    assert figures["clip"]["clip_artist_accuracy"] >= TARGETS["clip_artist_accuracy"]
    assert figures["clip"]["classifier_subject_accuracy"] >= 0.95


@pytest.mark.slow
def test_shipped_toy_world_meets_the_generation_target(tmp_path, shipped, home):
    from fixative.core.toy.report import TARGETS

    config = ReportConfig(samples_per_prompt=1, classifier_steps=150)
    figures = report(shipped, tmp_path / "report", config, parts=("generation",), log=lambda _: None)
    assert figures["generation"]["generation_attribution"] >= TARGETS["generation_attribution"]
    assert figures["generation"]["generation_subject"] >= 0.9  # the subject is recognisable


@pytest.mark.slow
def test_shipped_toy_world_can_be_mimicked(tmp_path, shipped, home):
    """The control condition of every protection experiment (about 3 minutes on 2 CPU cores)."""
    from fixative.core.toy.report import TARGETS

    config = ReportConfig(mimic_artists=("zenji",), mimic_samples_per_subject=2, classifier_steps=150)
    figures = report(shipped, tmp_path / "report", config, parts=("mimicry",), log=lambda _: None)
    mimicry = figures["mimicry"]["zenji"]
    assert mimicry["mimic_attribution"] >= TARGETS["mimic_attribution"]
    assert mimicry["mimic_trained_attribution"] >= TARGETS["mimic_trained_attribution"]
    assert mimicry["mimic_subject"] >= 0.8  # in style and subject, not only in style
