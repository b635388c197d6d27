"""The toy report (eval/toy_report.py): its parts on a `ci` build, the shipped world's targets, its helpers."""

import json
import math

import pytest
import torch

from fixative.cli import main
from fixative.core.errors import FixativeError
from fixative.eval.toy_report import TARGETS, ReportConfig, psnr_db, report


def test_psnr_of_a_known_error():
    reference = torch.zeros(2, 3, 8, 8)
    test = reference + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    assert torch.allclose(psnr_db(reference, test), torch.tensor([20.0, 20.0]), atol=1e-4)


def test_report_arguments():
    from fixative.cli import build_parser

    args = build_parser().parse_args(["toy", "report", "--parts", "vae,clip", "--mimic-steps", "10"])
    assert args.parts == ("vae", "clip") and args.mimic_steps == 10 and args.folder is None and args.seed == 0


def test_unknown_parts_are_refused(capsys):
    with pytest.raises(FixativeError, match="unknown report part"):
        report(parts=("vae", "speed"))
    with pytest.raises(SystemExit):
        main(["toy", "report", "--parts", "vae,speed"])
    assert "choose from vae, clip, generation, mimicry" in capsys.readouterr().err


@pytest.mark.slow
def test_report_runs_every_part_on_a_ci_build(ci_build, tmp_path):
    config = ReportConfig(
        num_inference_steps=2,
        samples_per_prompt=1,
        mimic_artists=("zenji",),
        mimic_images=4,
        mimic_steps=2,
        mimic_batch=2,
        mimic_prior_batch=2,
        mimic_samples_per_subject=1,
        classifier_steps=2,
    )
    lines = []
    figures = report(ci_build, tmp_path / "report", config, log=lines.append)
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
    vae_only = report(ci_build, tmp_path / "vae", config, parts=("vae",), log=lambda _: None)
    assert not any("classifier" in key for key in vae_only["seconds"])  # no part asked for the classifiers


@pytest.fixture(scope="session")
def shipped_figures(shipped, tmp_path_factory):
    """The shipped toy world measured once per session, with fewer samples than `fixative toy report` takes
    (which measured 26.4 dB VAE, 100% CLIP and generation attribution, mimicry 100%): one report, all parts."""
    import os

    home = tmp_path_factory.mktemp("home")  # the data set is repainted here, not in the user's FIXATIVE_HOME
    previous = os.environ.get("FIXATIVE_HOME")
    os.environ["FIXATIVE_HOME"] = str(home)
    try:
        config = ReportConfig(
            samples_per_prompt=1, mimic_artists=("zenji",), mimic_samples_per_subject=2, classifier_steps=150
        )
        yield report(shipped, home / "report", config, log=lambda _: None)
    finally:
        if previous is None:
            os.environ.pop("FIXATIVE_HOME")
        else:
            os.environ["FIXATIVE_HOME"] = previous


@pytest.mark.slow
def test_shipped_toy_world_meets_the_vae_and_clip_targets(shipped_figures):
    figures = shipped_figures
    assert figures["vae"]["vae_psnr_db"] >= TARGETS["vae_psnr_db"]
    assert figures["vae"]["vae_attribution"] >= TARGETS["vae_attribution"]
    assert figures["clip"]["clip_artist_accuracy"] >= TARGETS["clip_artist_accuracy"]
    assert figures["clip"]["classifier_subject_accuracy"] >= 0.95


@pytest.mark.slow
def test_shipped_toy_world_meets_the_generation_target(shipped_figures):
    assert shipped_figures["generation"]["generation_attribution"] >= TARGETS["generation_attribution"]
    assert shipped_figures["generation"]["generation_subject"] >= 0.9  # the subject is recognisable


@pytest.mark.slow
def test_shipped_toy_world_can_be_mimicked(shipped_figures):
    """The control condition of every protection experiment, through eval.mimicry on core's fine_tune."""
    mimicry = shipped_figures["mimicry"]["zenji"]
    assert mimicry["mimic_attribution"] >= TARGETS["mimic_attribution"]
    assert mimicry["mimic_trained_attribution"] >= TARGETS["mimic_trained_attribution"]
    assert mimicry["mimic_subject"] >= 0.8  # in style and subject, not only in style
