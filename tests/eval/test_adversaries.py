"""Each adversary does what it says."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fixative.cloak.budget import psnr, ssim
from fixative.core.errors import FixativeError
from fixative.eval.adversaries import (
    IMPRESS,
    JPEG,
    GaussianBlur,
    GaussianNoise,
    NoisyPurification,
    Resize,
    describe,
    parse_adversary,
    reconstruction_error,
)


@pytest.fixture(scope="module")
def images(paintings):
    return paintings("zenji", ["house", "cat", "fish"]).float() / 255


def test_jpeg_is_libjpegs_round_trip_and_its_error_falls_with_quality(images):
    out = JPEG(75)(images)
    buffer = io.BytesIO()
    Image.fromarray((images[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=75)
    decoded = torch.from_numpy(np.asarray(Image.open(buffer)).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(out[0], decoded)
    levels = [psnr(JPEG(q)(images).double(), images.double()).mean().item() for q in (10, 50, 90)]
    assert levels[0] < levels[1] < levels[2] and levels[0] < 30 < levels[2]


def test_noise_has_the_asked_standard_deviation_and_is_seeded():
    grey = torch.full((2, 3, 64, 64), 0.5)
    out = GaussianNoise(0.05)(grey, seed=1)
    assert (out - grey).std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(out, GaussianNoise(0.05)(grey, seed=1))
    assert not torch.equal(out, GaussianNoise(0.05)(grey, seed=2))


def test_blur_equals_torchvisions_gaussian_blur(images):
    from torchvision.transforms.functional import gaussian_blur

    out = GaussianBlur(1.0)(images)
    expected = gaussian_blur(images, kernel_size=7, sigma=1.0)  # radius ceil(3 sigma) = 3
    assert (out - expected).abs().max() <= 0.5 / 255 + 1e-6  # ours is quantised to 8 bits
    assert psnr(out.double(), images.double()).mean() < 40


def test_resize_removes_detail_finer_than_the_small_size():
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2  # 1-pixel checkerboard
    images = checker.float().expand(1, 3, 64, 64)
    out = Resize(0.5)(images)
    assert (out - 0.5).abs().max() < 0.05  # the pattern is gone, the mean grey is kept
    smooth = torch.linspace(0, 1, 64).expand(1, 3, 64, 64)
    assert (Resize(0.5)(smooth) - smooth).abs().max() < 0.02


def test_noisy_purification_repaints_close_to_the_input(images, toy_model):
    purify = NoisyPurification(noise=0.05, strength=0.2, steps=5)
    out = purify(images[:2], seed=0, model=toy_model)
    assert out.shape == images[:2].shape and torch.equal(out, purify(images[:2], seed=0, model=toy_model))
    noise = GaussianNoise(0.05)(images[:2], seed=0) - images[:2]
    # the repaint keeps the painting (the toy VAE alone reconstructs at about 26 dB) and drops the added noise
    assert psnr(out.double(), images[:2].double()).mean() > 18
    left = torch.nn.functional.cosine_similarity((out - images[:2]).flatten(), noise.flatten(), dim=0)
    assert left < 0.2
    further = NoisyPurification(noise=0.05, strength=0.6, steps=5)(images[:2], seed=0, model=toy_model)
    assert psnr(further.double(), images[:2].double()).mean() < psnr(out.double(), images[:2].double()).mean()
    with pytest.raises(FixativeError, match="needs the model"):
        purify(images, seed=0)


@pytest.mark.slow
def test_impress_lowers_the_vae_reconstruction_error_within_its_budget(images, toy_model):
    perturbed = GaussianNoise(8 / 255)(images[:2], seed=3)  # a stand-in for a protective perturbation
    impress = IMPRESS(steps=10, lr=0.002, budget=0.05)
    out = impress(perturbed, model=toy_model)
    with torch.no_grad():
        before, after = reconstruction_error(toy_model.vae, perturbed), reconstruction_error(toy_model.vae, out)
    assert (after < 0.8 * before).all()
    assert (1 - ssim(out.double(), perturbed.double()) <= impress.budget + 0.02).all()


def test_specs_parse_and_describe_round_trip():
    for spec in (
        "jpeg:75",
        "noise:0.05",
        "blur:1",
        "resize:0.5",
        "purify:noise=0.05,strength=0.2",
        "impress:steps=10,metric=ssim",
    ):
        adversary = parse_adversary(spec)
        assert parse_adversary(describe(adversary)) == adversary
    assert parse_adversary("jpeg:75") == JPEG(75) and parse_adversary("purify:strength=0.3").strength == 0.3
    with pytest.raises(FixativeError, match="unknown adversary"):
        parse_adversary("crop:2")
    with pytest.raises(FixativeError, match="no setting"):
        parse_adversary("jpeg:q=3")
    with pytest.raises(FixativeError, match="is not a int"):
        parse_adversary("jpeg:high")
