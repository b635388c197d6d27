"""An artist's files: sizes and modes come back as they went in, alpha untouched; batches survive a corrupt file and
resume; the command line's errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixative.cli import main
from fixative.cloak import Budget, CloakConfig, OptimiserConfig, cloak, cloak_files, files
from fixative.cloak import budget as metrics
from fixative.core.checkpoints import save_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = Budget(linf=12 / 255, psnr=30)


def _config(steps: int = 3) -> CloakConfig:
    return CloakConfig(method="photoguard", budget=BUDGET, optimiser=OptimiserConfig(steps=steps, lr=0.01))


def _caption_config() -> CloakConfig:
    """Glaze with a semantic term prompted by each image's caption in the target style (one quick step)."""
    config = CloakConfig(
        method="glaze",
        budget=BUDGET,
        optimiser=OptimiserConfig(steps=1, lr=0.01),
        target_style="cubism",
        semantic_weight=1.0,
        semantic_prompt="{caption} by {style}",
    )
    config.style_target.steps = 2
    return config


def _painting(width: int = 77, height: int = 131, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((4, 3, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    return np.asarray(coarse)


def _inputs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _painting()
    alpha = (np.indices(rgb.shape[:2]).sum(0) % 256).astype(np.uint8)
    images = {
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, alpha])),
        "grey.png": Image.fromarray(rgb).convert("L"),
        "palette.png": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }
    for name, image in images.items():
        image.save(folder / name)
    return images


@pytest.mark.parametrize(
    "name, mode",
    [("rgb.png", "RGB"), ("rgba.png", "RGBA"), ("grey.png", "L"), ("palette.png", "P"), ("deep.png", "I;16")],
)
def test_images_come_back_in_their_size_and_mode_with_alpha_untouched(tiny_model, tmp_path, name, mode):
    images = _inputs(tmp_path / "in")
    [result] = cloak([tmp_path / "in" / name], tiny_model, _config())
    assert result.image.size == (77, 131) and result.image.mode == Image.open(tmp_path / "in" / name).mode == mode
    assert result.record["budget_met"]
    if mode == "RGBA":
        assert np.array_equal(np.asarray(result.image)[..., 3], np.asarray(images[name])[..., 3])
    if mode in ("RGB", "RGBA", "L", "I;16"):  # a palette cannot hold the change exactly; it is measured as stored
        original = files.artwork_from_image(images[name]).pixels
        stored = files.artwork_from_image(result.image).pixels
        assert metrics.linf(stored, original).item() <= BUDGET.linf + 1e-6
        assert metrics.psnr(stored, original).item() >= BUDGET.psnr
        assert not torch.equal(stored, original)
    if mode == "L":
        assert np.asarray(result.image).ndim == 2


def test_icc_profile_and_exif_orientation_are_kept(tiny_model, tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[files.EXIF_ORIENTATION] = 6  # stored on its side: shown rotated 90 degrees
    exif[0x010F] = "a camera"
    Image.fromarray(_painting(40, 24)).save(tmp_path / "photo.png", icc_profile=icc, exif=exif)
    [result] = cloak([tmp_path / "photo.png"], tiny_model, _config())
    assert result.image.size == (24, 40)  # upright, as a viewer shows it
    out = tmp_path / "out.png"
    artwork = files.read_artwork(tmp_path / "photo.png")
    files.write_artwork(artwork, files.artwork_from_image(result.image).pixels, out)
    with Image.open(out) as written:
        assert written.info["icc_profile"] == icc
        assert written.getexif()[files.EXIF_ORIENTATION] == 1 and written.getexif()[0x010F] == "a camera"


def test_large_images_are_cloaked_in_blended_tiles(tiny_model):
    image = Image.fromarray(_painting(70, 44))
    [result] = cloak([image], tiny_model, _config(steps=4), tile_size=32)
    assert result.record["tiles"] == 6 and result.image.size == (70, 44) and result.record["budget_met"]


def _record_cloaked_files(monkeypatch) -> list[str]:
    """From now on, the file names ``cloak_artwork`` is called on, in order."""
    from fixative.cloak import api

    cloaked = []
    real = api.cloak_artwork
    monkeypatch.setattr(
        api,
        "cloak_artwork",
        lambda model, artwork, *a, **k: cloaked.append(artwork.path.name) or real(model, artwork, *a, **k),
    )
    return cloaked


def test_a_corrupt_file_is_reported_and_the_batch_finishes_then_resumes(tiny_model, tmp_path, monkeypatch):
    _inputs(tmp_path / "in" / "sub")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    messages = []
    summary = cloak_files(
        [tmp_path / "in"], tmp_path / "out", tiny_model, _config(), progress=False, log=messages.append
    )
    assert summary["images"] == 5 and len(summary["failed"]) == 1 and "broken.png" in summary["failed"][0]["input"]
    assert any("broken.png" in m for m in messages)
    record = json.loads((tmp_path / "out" / "sub" / "rgba.json").read_text())
    assert record["method"] == "photoguard" and record["provenance"]["settings_hash"] == summary["settings_hash"]
    assert (tmp_path / "out" / "sub" / "rgba.png").is_file() and (tmp_path / "out" / "summary.json").is_file()
    # an interrupted run: one output missing; the rerun redoes that one only
    (tmp_path / "out" / "sub" / "grey.json").unlink()
    cloaked = _record_cloaked_files(monkeypatch)
    again = cloak_files([tmp_path / "in"], tmp_path / "out", tiny_model, _config(), progress=False, log=messages.append)
    assert cloaked == ["grey.png"] and again["skipped_as_done"] == 4
    # other settings: everything is redone
    cloaked.clear()
    cloak_files([tmp_path / "in"], tmp_path / "out", tiny_model, _config(steps=2), progress=False, log=messages.append)
    assert len(cloaked) == 5


@pytest.fixture(scope="module")
def tiny_folder(tiny_model, tmp_path_factory):
    return save_diffusers(tiny_model, tmp_path_factory.mktemp("cloak") / "tiny")


def test_cli_cloaks_a_folder_and_prints_the_summary(tiny_folder, tmp_path, capsys):
    _inputs(tmp_path / "in")
    code = main(
        [
            "cloak",
            str(tmp_path / "in" / "rgb.png"),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny_folder),
            "--method",
            "photoguard",
            "--budget",
            "psnr=32",
            "--budget",
            "linf=8/255",
            "--steps",
            "2",
            "--seed",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "rgb.png" in out and "1 cloaked" in out
    record = json.loads((tmp_path / "out" / "rgb.json").read_text())
    assert record["budget"] == {"linf": 8 / 255, "psnr": 32.0} and record["settings"]["seed"] == 1


def test_cli_passes_the_objective_options_into_the_record(tiny_folder, tmp_path, capsys):
    _inputs(tmp_path / "in")
    common = ["--out", str(tmp_path / "out"), "--model", str(tiny_folder), "--budget", "psnr=32", "--steps", "1"]
    glaze = ["--method", "glaze", "--target-style", "cubism", "--target-steps", "2", "--latent-pool", "4"]
    semantic = ["--semantic-weight", "0.5", "--semantic-prompt", "art in the style of {style}"]
    code = main(["cloak", str(tmp_path / "in" / "rgb.png"), *common, *glaze, "--target-push", "2", *semantic])
    assert code == 0
    record = json.loads((tmp_path / "out" / "rgb.json").read_text())
    assert (record["latent_pool"], record["target_push"], record["semantic_weight"]) == (4, 2.0, 0.5)
    assert record["semantic_prompt"] == "art in the style of cubism" and "caption" not in record
    surrogate = ["--method", "anti-dreambooth", "--surrogate-warmup", "2", "--surrogate-every", "0"]
    code = main(["cloak", str(tmp_path / "in" / "rgb.png"), *common, *surrogate, "--quiet"])
    record = json.loads((tmp_path / "out" / "rgb.json").read_text())
    assert code == 0 and record["surrogate_warmup_steps"] == 2 and record["surrogate_every"] == 0
    assert len(record["surrogate_warmup_loss"]) == 2


def test_records_carry_the_weight_hashes_and_new_weights_redo_the_batch(tiny_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from fixative.core.checkpoints import load_model
    from fixative.core.provenance import sha256

    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    model = load_model(folder)
    Image.fromarray(_painting(24, 16)).save(tmp_path / "a.png")
    summary = cloak_files([tmp_path / "a.png"], tmp_path / "out", model, _config(steps=1), progress=False)
    weights = summary["provenance"]["model"]["sha256"]
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    assert weights["vae/diffusion_pytorch_model.safetensors"] == sha256(vae_file) and len(weights) == 3
    record = json.loads((tmp_path / "out" / "a.json").read_text())
    assert record["provenance"]["model"] == summary["provenance"]["model"]
    again = cloak_files([tmp_path / "a.png"], tmp_path / "out", model, _config(steps=1), progress=False)
    assert again["skipped_as_done"] == 1
    tensors = load_file(vae_file)  # the same file name with other weights: not the same model, so not done
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, vae_file)
    changed = cloak_files([tmp_path / "a.png"], tmp_path / "out", model, _config(steps=1), progress=False)
    assert changed["skipped_as_done"] == 0 and changed["settings_hash"] != summary["settings_hash"]


def test_cli_missing_lpips_backbone_is_a_one_line_error(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _inputs(tmp_path / "in")
    code = main(
        [
            "cloak",
            str(tmp_path / "in" / "rgb.png"),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny_folder),
            "--method",
            "photoguard",
            "--steps",
            "1",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "alexnet-owt-7be5be79.pth" in err and "Traceback" not in err


def test_cli_random_lpips_backbone_is_written_in_every_record(tiny_folder, tmp_path):
    _inputs(tmp_path / "in")
    code = main(
        [
            "cloak",
            str(tmp_path / "in" / "rgb.png"),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny_folder),
            "--method",
            "photoguard",
            "--steps",
            "1",
            "--quiet",
            "--lpips-backbone",
            "random",
            "--budget",
            "lpips=0.2",
            "--budget",
            "linf=8/255",
        ]
    )
    record = json.loads((tmp_path / "out" / "rgb.json").read_text())
    assert code == 0 and record["lpips_backbone"] == "random" and "not LPIPS" in record["lpips_note"]
    assert "lpips" in record["values"]


def test_cli_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["cloak", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in (
        "--out",
        "--model",
        "--method",
        "--target-style",
        "--budget",
        "--steps",
        "--lr",
        "--strength",
        "--robust",
        "--seed",
        "--device",
        "--dtype",
        "--quiet",
        "--lpips-weights",
        "--format",
    ):
        assert option in text
    assert "(default: glaze)" in text and "(default: lpips=0.07)" in text and "(default: 500)" in text


def test_captions_come_from_a_text_file_beside_the_image_or_the_folders_metadata(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("a painting of a cat\n")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.png", "text": "a painting of a boat"}) + "\n" + json.dumps({"file_name": "c.png"})
    )
    assert files.read_caption(tmp_path / "a.png") == "a painting of a cat"  # the text file first
    assert files.read_caption(tmp_path / "b.png") == "a painting of a boat"
    assert files.read_caption(tmp_path / "c.png") is None and files.read_caption(tmp_path / "d.png") is None
    with (tmp_path / "metadata.jsonl").open("a") as metadata:  # an edit is seen by the next lookup
        metadata.write("\n" + json.dumps({"file_name": "d.png", "text": "a painting of a dog"}))
    assert files.read_caption(tmp_path / "d.png") == "a painting of a dog"
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(files.FixativeError, match=r"metadata.jsonl, line 1: not JSON"):
        files.read_caption(tmp_path / "b.png")


def test_caption_prompts_in_a_batch_an_uncaptioned_image_fails_alone_and_a_new_caption_redoes_its_image(
    tiny_model, tmp_path, monkeypatch
):

    (tmp_path / "in").mkdir()
    for name, seed in (("a", 0), ("b", 1)):
        Image.fromarray(_painting(24, 16, seed)).save(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "a.txt").write_text("a painting of a cat")
    config = _caption_config()
    messages = []
    summary = cloak_files([tmp_path / "in"], tmp_path / "out", tiny_model, config, progress=False, log=messages.append)
    assert summary["images"] == 1 and len(summary["failed"]) == 1 and "b.png" in summary["failed"][0]["input"]
    assert "no caption" in summary["failed"][0]["error"]
    assert any(m.startswith(f"failed: {tmp_path / 'in' / 'b.png'}: ") and "IMAGE.txt" in m for m in messages)
    record = json.loads((tmp_path / "out" / "a.json").read_text())
    assert record["caption"] == "a painting of a cat" and record["semantic_prompt"] == "a painting of a cat by cubism"
    cloaked = _record_cloaked_files(monkeypatch)
    cloak_files([tmp_path / "in"], tmp_path / "out", tiny_model, config, progress=False, log=messages.append)
    assert cloaked == ["b.png"]  # a: same settings, same caption, so done; b is tried again (and fails again)
    (tmp_path / "in" / "a.txt").write_text("a painting of a dog")
    cloaked.clear()
    cloak_files([tmp_path / "in"], tmp_path / "out", tiny_model, config, progress=False, log=messages.append)
    assert cloaked == ["a.png", "b.png"]
    assert json.loads((tmp_path / "out" / "a.json").read_text())["caption"] == "a painting of a dog"


def test_the_api_takes_captions_for_images_in_memory_and_fails_an_uncaptioned_one_alone(tiny_model):
    config = _caption_config()
    images = (Image.fromarray(_painting(24, 16, seed)) for seed in (0, 1))  # any iterable
    done, failed = cloak(images, tiny_model, config, captions=["a painting of a cat", None])
    assert done.image.size == (24, 16) and done.record["semantic_prompt"] == "a painting of a cat by cubism"
    assert failed.image is None and "no caption" in failed.record["error"]
    with pytest.raises(files.FixativeError, match="1 captions for 2 images"):
        cloak([Image.fromarray(_painting(24, 16))] * 2, tiny_model, config, captions=["a painting of a cat"])


def test_captions_are_read_only_when_the_prompt_names_them(tiny_model, tmp_path):
    Image.fromarray(_painting(24, 16)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("{not json\n")  # would fail any caption lookup in this folder
    (plain,) = cloak([tmp_path / "a.png"], tiny_model, _config(steps=1))
    assert plain.image is not None and "caption" not in plain.record
    (captioned,) = cloak([tmp_path / "a.png"], tiny_model, _caption_config())
    assert captioned.image is None and "metadata.jsonl, line 1: not JSON" in captioned.record["error"]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bf16_autocast_on_a_cpu_without_native_bf16_is_said_in_one_line(tiny_model, tmp_path, monkeypatch, native_bf16):
    monkeypatch.setattr("fixative.core.layout.mkldnn_bf16_supported", lambda: native_bf16)
    Image.fromarray(_painting(16, 16)).save(tmp_path / "art.png")
    config = _config(steps=1)
    config.optimiser.autocast = "bf16"
    lines = []
    summary = cloak_files(
        [tmp_path / "art.png"], tmp_path / "out", tiny_model, config, progress=False, log=lines.append
    )
    assert summary["failed"] == [] and (tmp_path / "out" / "art.png").exists()
    warned = [line for line in lines if "no native bf16" in line and "--autocast none" in line]
    assert len(warned) == (0 if native_bf16 else 1)


@pytest.mark.slow
def test_two_processes_under_torchrun_share_a_batch_and_cloak_as_one_does(tiny_folder, tmp_path):
    """Each process cloaks every other file; the outputs equal a one-process run's, and the main process's summary
    lists every image and the failure of the process that met the corrupt file."""
    import os
    import subprocess
    import sys

    _inputs(tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    options = ["--model", str(tiny_folder), "--method", "photoguard", "--budget", "psnr=32", "--steps", "2"]
    assert main(["cloak", str(tmp_path / "in"), "--out", str(tmp_path / "one"), *options, "--quiet"]) == 1
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "fixative", "cloak", str(tmp_path / "in")]
        + ["--out", str(tmp_path / "two"), *options, "--device", "auto"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0 and "broken.png" in result.stdout + result.stderr
    one, two = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert two["images"] == one["images"] == 5 and [f["input"] for f in two["failed"]] == [
        str(tmp_path / "in" / "broken.png")
    ]
    assert [Path(r["input"]).name for r in two["per_image"]] == [Path(r["input"]).name for r in one["per_image"]]
    found = [str(path) for path, _ in files.find_images([tmp_path / "in"])]
    for row in two["per_image"]:
        name = Path(row["output"]).name
        assert np.array_equal(np.asarray(Image.open(row["output"])), np.asarray(Image.open(tmp_path / "one" / name)))
        process = json.loads(Path(row["output"]).with_suffix(".json").read_text())["provenance"]["process"]
        assert process == f"{found.index(row['input']) % 2} of 2"  # every other file


def _alexnet_in_the_hub_cache(folder) -> None:
    import torchvision

    from fixative.cloak.budget import LPIPS_BACKBONE_FILES

    (folder / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), folder / "hub" / "checkpoints" / LPIPS_BACKBONE_FILES["alex"])


def test_lpips_is_measured_into_the_record_when_its_backbone_file_is_there_and_changes_nothing(
    tiny_model, tmp_path, monkeypatch
):
    Image.fromarray(_painting(40, 32)).save(tmp_path / "art.png")
    Image.fromarray(_painting(24, 16)).save(tmp_path / "icon.png")  # too small for AlexNet: not measured
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    without = cloak([tmp_path / "art.png"], tiny_model, _config(steps=2))[0]  # no file: no LPIPS, no error
    _alexnet_in_the_hub_cache(tmp_path / "torch")
    measured, icon = cloak([tmp_path / "art.png", tmp_path / "icon.png"], tiny_model, _config(steps=2))
    assert "lpips" not in without.record["values"] and measured.record["values"]["lpips"] >= 0
    assert measured.record["lpips_backbone"] == "pretrained"
    assert np.array_equal(np.asarray(without.image), np.asarray(measured.image))  # measured, never bounded
    assert icon.image is not None and "lpips" not in icon.record["values"]


def test_an_image_too_small_for_an_lpips_bound_fails_alone_in_one_line(tiny_model, tmp_path, monkeypatch):
    Image.fromarray(_painting(40, 32)).save(tmp_path / "art.png")
    Image.fromarray(_painting(24, 16)).save(tmp_path / "icon.png")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _alexnet_in_the_hub_cache(tmp_path / "torch")
    config = CloakConfig(method="photoguard", budget=Budget(lpips=0.07), optimiser=OptimiserConfig(steps=1))
    lines = []
    summary = cloak_files([tmp_path], tmp_path / "out", tiny_model, config, progress=False, log=lines.append)
    assert summary["images"] == 1 and [Path(f["input"]).name for f in summary["failed"]] == ["icon.png"]
    assert "at least 31 px on each side, this one is 24x16" in summary["failed"][0]["error"]
    assert [line for line in lines if line.startswith("failed:")] == [
        f"failed: {tmp_path / 'icon.png'}: " + summary["failed"][0]["error"]
    ]
