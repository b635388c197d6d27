"""``fixative generate``: PNGs with their settings, the same image as the Python API, one-line errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fixative.cli import main
from fixative.core.checkpoints import load_model
from fixative.core.pipelines import generate

OPTIONS = (
    "--model",
    "--prompt",
    "--negative-prompt",
    "--seed",
    "--steps",
    "--guidance",
    "--guidance-rescale",
    "--scheduler",
    "--height",
    "--width",
    "--num-images",
    "--init-image",
    "--strength",
    "--mask",
    "--clip-skip",
    "--vae-tiling",
    "--dtype",
    "--device",
    "--quiet",
    "--out",
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_folder(sd_folder):
    return sd_folder("tiny-sd1")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def base_args(folder, out):
    return (
        "--model",
        folder,
        "--prompt",
        "a lighthouse at dusk",
        "--steps",
        2,
        "--height",
        32,
        "--width",
        32,
        "--quiet",
        "--out",
        out,
    )


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in OPTIONS:
        assert option in text, f"{option} missing from --help"
    for default in (
        "(default: toy)",
        "(default: 0)",
        "(default: 30)",
        "(default: 7.5)",
        "(default: fp32)",
        "(default: auto)",
    ):
        assert default in text


def test_generate_writes_a_png_with_its_settings_and_the_api_image(capsys, tmp_path, model_folder):
    out = tmp_path / "render.png"
    code, stdout, _ = run(
        capsys, *base_args(model_folder, out), "--seed", 7, "--scheduler", "euler-a", "--negative-prompt", "blurry"
    )
    assert code == 0 and stdout.strip() == str(out)
    image = Image.open(out)
    assert image.size == (32, 32)
    settings = image.text
    assert settings["prompt"] == "a lighthouse at dusk" and settings["negative_prompt"] == "blurry"
    assert settings["seed"] == "7" and settings["steps"] == "2" and settings["scheduler"] == "euler-a"
    assert settings["model"] == str(model_folder)
    record = json.loads(settings["provenance"])
    assert record["versions"]["fixative"] and record["versions"]["torch"] == torch.__version__
    assert (record["device"], record["dtype"]) == ("cpu", "float32")
    weights = model_folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert (
        record["models"]["model"]["sha256"]["unet/diffusion_pytorch_model.safetensors"]
        == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    expected = generate(
        load_model(model_folder),
        "a lighthouse at dusk",
        "blurry",
        height=32,
        width=32,
        num_inference_steps=2,
        scheduler="euler-a",
        seed=7,
        progress=False,
    )[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    assert [p.name for p in tmp_path.iterdir()] == ["render.png"]  # no temporary files left behind


def test_several_images_go_to_a_folder(capsys, tmp_path, model_folder):
    out = tmp_path / "renders"
    code, stdout, _ = run(capsys, *base_args(model_folder, out), "--num-images", 2)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["image-000.png", "image-001.png"]
    first, second = (np.asarray(Image.open(out / name)) for name in ("image-000.png", "image-001.png"))
    assert not np.array_equal(first, second)
    assert Image.open(out / "image-001.png").text["image_index"] == "1"


def test_img2img_and_inpainting_record_their_inputs(capsys, tmp_path, model_folder):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    mask_image = Image.new("L", (32, 32), 0)
    mask_image.paste(255, (8, 8, 24, 24))
    mask_image.save(mask)
    code, _, _ = run(capsys, *base_args(model_folder, tmp_path / "i2i.png"), "--init-image", init, "--strength", 0.5)
    assert code == 0 and Image.open(tmp_path / "i2i.png").text["strength"] == "0.5"
    code, _, _ = run(capsys, *base_args(model_folder, tmp_path / "inpaint.png"), "--init-image", init, "--mask", mask)
    assert code == 0
    painted = np.asarray(Image.open(tmp_path / "inpaint.png").convert("RGB")).astype(int)
    assert Image.open(tmp_path / "inpaint.png").text["mask"] == str(mask)
    # outside the mask the latents are the init image's, so the picture stays close to it there
    original = np.asarray(Image.open(init)).astype(int)
    keep = np.asarray(mask_image) == 0
    keep[6:26, 6:26] = False  # the VAE's receptive field bleeds across the mask's edge
    assert np.abs(painted - original)[keep].mean() < np.abs(painted - original)[~keep].mean()


def one_line_error(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fixative: error:"), err
    return lines[0]


def test_a_size_not_a_multiple_of_the_models_factor_is_a_one_line_error(capsys, tmp_path, model_folder):
    # the tiny model's VAE down-samples twice: any even size works, 33 does not
    message = one_line_error(
        capsys, "--model", model_folder, "--prompt", "x", "--width", 33, "--out", tmp_path / "a.png"
    )
    assert "--width 33" in message and "multiple of 2" in message and not (tmp_path / "a.png").exists()


def test_missing_model_is_a_one_line_error(capsys, tmp_path):
    message = one_line_error(
        capsys, "--model", tmp_path / "no-such-model", "--prompt", "x", "--out", tmp_path / "a.png"
    )
    assert "no-such-model" in message


def test_unreadable_init_image_is_a_one_line_error(capsys, tmp_path, model_folder):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    message = one_line_error(capsys, *base_args(model_folder, tmp_path / "a.png"), "--init-image", broken)
    assert "broken.png" in message


def test_mask_of_the_wrong_size_is_a_one_line_error(capsys, tmp_path, model_folder):
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    Image.new("L", (16, 32)).save(tmp_path / "mask.png")
    message = one_line_error(
        capsys,
        *base_args(model_folder, tmp_path / "a.png"),
        "--init-image",
        tmp_path / "init.png",
        "--mask",
        tmp_path / "mask.png",
    )
    assert "16x32" in message and "32x32" in message


def test_several_images_into_one_file_is_a_one_line_error(capsys, tmp_path, model_folder):
    message = one_line_error(capsys, *base_args(model_folder, tmp_path / "a.png"), "--num-images", 3)
    assert "give a folder" in message
