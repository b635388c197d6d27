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
                          mimic_steps=2, mimic_batch=2, mimic_prior_batch=2, mimic_samples_per_subject=1)
    lines = []
    figures = report(folder, tmp_path / "report", config, log=lines.append)
    for key in ("vae_attribution", "vae_psnr_db"):
        assert math.isfinite(figures["vae"][key])
    assert 0 <= figures["clip"]["clip_artist_accuracy"] <= 1
    assert figures["generation"]["images"] == 8 * 8
    mimicry = figures["mimicry"]["zenji"]
    assert mimicry["name"] == "nabu" and 0 <= mimicry["mimic_attribution"] <= 1
    assert sum(mimicry["attributed_to"].values()) == 8
    assert (tmp_path / "report" / "samples.png").is_file()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["targets"]["vae_psnr_db"] == 22.0
    assert any("target >= 90%" in line for line in lines)
