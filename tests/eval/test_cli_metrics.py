"""`fixative metrics ...` over image folders: one JSON object, values equal to the references."""

import json

import pytest
import torch
from PIL import Image

from fixative.cli import main
from fixative.eval.features import CLIPFeatures
from fixative.eval.fid import fid, kid

SUBJECTS = ["house", "tree", "boat", "sun", "fish", "cat"]


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def run(capsys, *argv) -> dict:
    assert main(["metrics", *map(str, argv), "--quiet", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def folders(tmp_path, paintings):
    real = write_images(tmp_path / "real", paintings("kovra", SUBJECTS))
    fake = write_images(tmp_path / "fake", paintings("miska", SUBJECTS))
    return real, fake


def test_fid_and_kid_with_the_toy_clip_features(capsys, tmp_path, folders, toy_clip, paintings):
    real, fake = folders
    result = run(capsys, "fid", real, fake, "--features", f"clip:{toy_clip}", "--cache", tmp_path / "cache")
    extractor = CLIPFeatures(toy_clip)
    a, b = extractor(paintings("kovra", SUBJECTS)), extractor(paintings("miska", SUBJECTS))
    assert result["value"] == pytest.approx(fid(a, b), rel=1e-4)
    assert result["features"]["weights_sha256"] == extractor.provenance["weights_sha256"]
    assert result["real"]["images"] == 6 and result["real"]["cache"] == "miss" and result["provenance"]["seed"] == 0
    again = run(capsys, "fid", real, real, "--features", f"clip:{toy_clip}", "--cache", tmp_path / "cache")
    assert abs(again["value"]) < 1e-6 and again["real"]["cache"] == "hit"
    scores = run(
        capsys,
        "kid",
        real,
        fake,
        "--features",
        f"clip:{toy_clip}",
        "--no-cache",
        "--subsets",
        3,
        "--subset-size",
        4,
        "--seed",
        5,
    )
    assert scores["value"] == pytest.approx(kid(a, b, subsets=3, subset_size=4, seed=5).mean, rel=1e-4)


@pytest.mark.slow
def test_fid_with_the_inception_weights_file(capsys, folders, random_inception_file):
    real, fake = folders
    result = run(capsys, "fid", real, fake, "--inception-weights", random_inception_file, "--no-cache")
    assert result["value"] > 0 and result["features"]["weights"] == str(random_inception_file)
    assert len(result["features"]["weights_sha256"]) == 64 and result["fake"]["images"] == 6


def test_missing_inception_weights_is_one_line_exit_2(capsys, tmp_path, folders, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    real, fake = folders
    assert main(["metrics", "fid", str(real), str(fake), "--no-cache", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pt_inception-2015-12-05-6726825d.pth" in error


def test_clip_score_command(capsys, tmp_path, folders, toy_clip, paintings):
    from fixative.eval.clip_score import CLIPScorer

    real, _ = folders
    prompts = [f"a painting of a {s} by kovra" for s in SUBJECTS]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    result = run(capsys, "clip-score", real, "--prompts", tmp_path / "prompts.txt", "--clip", toy_clip)
    assert result["value"] == pytest.approx(CLIPScorer(toy_clip)(paintings("kovra", SUBJECTS), prompts).value, rel=1e-5)
    assert list(result["per_image"]) == [f"{i:03d}.png" for i in range(6)]
    (tmp_path / "short.txt").write_text("one prompt\n")
    assert (
        main(["metrics", "clip-score", str(real), "--prompts", str(tmp_path / "short.txt"), "--clip", str(toy_clip)])
        == 2
    )


def test_ssim_and_psnr_commands_equal_torchmetrics(capsys, tmp_path, paintings):
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    clean = paintings("tazu", SUBJECTS[:3])
    generator = torch.Generator().manual_seed(0)
    noisy = (clean.float() + 12 * torch.randn(clean.shape, generator=generator)).clamp(0, 255).round().byte()
    test, reference = write_images(tmp_path / "test", noisy), write_images(tmp_path / "ref", clean)
    ssim_result = run(capsys, "ssim", test, reference)
    psnr_result = run(capsys, "psnr", test, reference)
    for i, name in enumerate(sorted(ssim_result["per_image"])):
        x, y = noisy[i : i + 1].double() / 255, clean[i : i + 1].double() / 255
        assert ssim_result["per_image"][name] == pytest.approx(
            float(StructuralSimilarityIndexMeasure(data_range=1.0).double()(x, y)), abs=1e-6
        )
        assert psnr_result["per_image"][name] == pytest.approx(
            float(PeakSignalNoiseRatio(data_range=1.0)(x, y)), abs=1e-4
        )
    assert psnr_result["value"] == pytest.approx(sum(psnr_result["per_image"].values()) / 3)
    assert 20 < psnr_result["value"] < 30  # sigma 12/255 noise: about 26.5 dB


def test_lpips_command_equals_the_lpips_package(capsys, tmp_path, paintings):
    """A random AlexNet saved as torchvision's file (no pretrained one exists here): the command reads it, and
    equals lpips built on the same trunk."""
    import warnings

    import lpips
    import torchvision

    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet()
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(alexnet.state_dict(), weights)
    clean = paintings("orlen", SUBJECTS[:2])
    shifted = (clean.int() + 20).clamp(0, 255).byte()
    test, reference = write_images(tmp_path / "test", shifted), write_images(tmp_path / "ref", clean)
    result = run(capsys, "lpips", test, reference, "--lpips-weights", weights)
    assert result["provenance"]["backbone"] == "pretrained" and result["provenance"]["backbone_weights"] == str(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference_metric = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    for slice_ in (
        reference_metric.net.slice1,
        reference_metric.net.slice2,
        reference_metric.net.slice3,
        reference_metric.net.slice4,
        reference_metric.net.slice5,
    ):
        for name, module in slice_.named_children():
            module.load_state_dict(alexnet.features[int(name)].state_dict())
    expected = reference_metric(shifted.float() / 127.5 - 1, clean.float() / 127.5 - 1).flatten()
    assert [result["per_image"][k] for k in sorted(result["per_image"])] == pytest.approx(expected.tolist(), abs=1e-5)
    random = run(capsys, "lpips", test, reference, "--lpips-backbone", "random")
    assert "not LPIPS" in random["provenance"]["warning"]
