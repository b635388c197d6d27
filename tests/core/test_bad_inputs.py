"""A corpus of bad and odd inputs through every command that reads them (``info``, ``convert``, ``generate``).

A bad input must give at most two lines on stderr, exit != 0, no traceback, nothing written, and a pickle's code
must never run. Most cases call the command's ``main`` in this process (a traceback there is an exception that
fails the test; warnings are counted as stderr lines, as a terminal would show them); a handful run as real
``fixative`` subprocesses, which is what a user sees. Odd but valid images must work.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fixative.cli import main
from fixative.core import single_file
from fixative.core.checkpoints import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class CarriesCode:
    """Unpickling this calls os.mkdir(marker): the marker folder appears only if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height (1-bit) and holds one compressed row: Pillow reads the size on open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sd_folder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    folder = Path(shutil.copytree(sd_folder("tiny-sd1"), root / "good"))
    model = load_model(folder)
    state = single_file.to_original({n: m.state_dict() for n, m in model.networks().items()}, model.config)
    save_file({k: v.contiguous() for k, v in state.items()}, root / "whole.safetensors")
    torch.save({"state_dict": state}, root / "whole.ckpt")

    files = {
        "empty.ckpt": b"",
        "empty.safetensors": b"",
        "truncated.safetensors": (root / "whole.safetensors").read_bytes()[:5000],
        "truncated.ckpt": (root / "whole.ckpt").read_bytes()[:5000],
        "random.safetensors": np.random.default_rng(0).bytes(4096),
        "random.ckpt": np.random.default_rng(1).bytes(4096),
        "page.safetensors": b"<!DOCTYPE html><html><body>Sign in to download this model</body></html>\n",
        "terabytes.safetensors": struct.pack("<Q", 2**40) + b"{}",
        "not-json.safetensors": struct.pack("<Q", 16) + b"this is not JSON" + b"\0" * 64,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    with zipfile.ZipFile(root / "garbage-zip.ckpt", "w") as archive:
        archive.writestr("archive/data.pkl", np.random.default_rng(2).bytes(512))
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": CarriesCode(root / "code-ran")}, root / "code.ckpt")

    (root / "empty-folder").mkdir()
    shutil.copytree(folder, root / "no-vae")
    shutil.rmtree(root / "no-vae" / "vae")
    shutil.copytree(folder, root / "swapped")  # the UNet folder holds the VAE's weights
    shutil.copy(
        folder / "vae" / "diffusion_pytorch_model.safetensors",
        root / "swapped" / "unet" / "diffusion_pytorch_model.safetensors",
    )
    shutil.copytree(folder, root / "scheduler-not-object")
    (root / "scheduler-not-object" / "scheduler" / "scheduler_config.json").write_text("[1, 2, 3]")
    shutil.copytree(folder, root / "scheduler-unknown-betas")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (root / "scheduler-unknown-betas" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(dict(config, beta_schedule="cosine-ish"))
    )

    Image.new("RGB", (32, 32), (120, 80, 40)).save(root / "init.png")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes((root / "init.png").read_bytes()[:60])
    (root / "not-an-image.png").write_text("just text")
    png_header_only(root / "huge.png", 20000, 20000)
    return {path.name: path for path in root.iterdir()}


BAD_MODELS = [
    "empty.ckpt",
    "empty.safetensors",
    "truncated.safetensors",
    "truncated.ckpt",
    "random.safetensors",
    "random.ckpt",
    "page.safetensors",
    "terabytes.safetensors",
    "not-json.safetensors",
    "garbage-zip.ckpt",
    "code.ckpt",
    "empty-folder",
    "no-vae",
    "swapped",
    "scheduler-not-object",
]
BAD_IMAGES = ["empty.png", "truncated.png", "not-an-image.png", "huge.png"]


def command_line(command: str, model: Path, out: Path, *extra) -> list[str]:
    if command == "info":
        return ["info", str(model)]
    if command == "convert":
        return ["convert", str(model), str(out / "converted")]
    return [
        "generate",
        "--model",
        str(model),
        "--prompt",
        "a boat",
        "--steps",
        "1",
        "--height",
        "16",
        "--width",
        "16",
        "--quiet",
        "--out",
        str(out / "images"),
        *map(str, extra),
    ]


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``fixative argv``, warnings counted into stderr; argparse errors exit too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    err = capsys.readouterr().err + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return code, err


def assert_refused(code: int, err: str, out: Path, corpus: dict[str, Path]) -> None:
    lines = err.strip().splitlines()
    assert code != 0, "exit code 0"
    assert 1 <= len(lines) <= 2 and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir()), f"left behind: {sorted(p.name for p in out.iterdir())}"
    assert not (corpus["code.ckpt"].parent / "code-ran").exists(), "the pickle's code ran"


@pytest.mark.parametrize("command", ["info", "convert", "generate"])
def test_bad_models_are_refused_in_one_line(command, corpus, tmp_path, capsys):
    for name in BAD_MODELS:
        out = tmp_path / name
        out.mkdir()
        code, err = run_in_process(command_line(command, corpus[name], out), capsys)
        assert_refused(code, err, out, corpus)
        assert name in err, err  # the message names the input


def test_a_scheduler_config_that_cannot_sample_is_refused_by_generate(corpus, tmp_path, capsys):
    code, err = run_in_process(command_line("generate", corpus["scheduler-unknown-betas"], tmp_path), capsys)
    assert_refused(code, err, tmp_path, corpus)
    assert "cosine-ish" in err


@pytest.mark.parametrize("option", ["--init-image", "--mask"])
def test_bad_images_are_refused_in_one_line(option, corpus, tmp_path, capsys):
    for name in BAD_IMAGES:
        out = tmp_path / name
        out.mkdir()
        images = (
            ["--init-image", corpus[name]]
            if option == "--init-image"
            else ["--init-image", corpus["init.png"], "--mask", corpus[name]]
        )
        code, err = run_in_process(command_line("generate", corpus["good"], out, *images), capsys)
        assert_refused(code, err, out, corpus)
        assert name in err
    assert "400,000,000 pixels" in err and f"{Image.MAX_IMAGE_PIXELS:,}" in err  # huge.png, the last one


def odd_images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    paths = {name: folder / name for name in ("cmyk.jpg", "palette.png", "gray16.png", "rgba.png")}
    rgb.convert("CMYK").save(paths["cmyk.jpg"])
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(paths["palette.png"], transparency=0)
    Image.fromarray((rng.integers(0, 65536, (24, 24))).astype(np.uint16)).save(paths["gray16.png"])
    rgb.convert("RGBA").save(paths["rgba.png"])
    return paths


def test_odd_but_valid_images_work_as_init_image_and_mask(corpus, tmp_path, capsys):
    for name, path in odd_images(tmp_path).items():
        out = tmp_path / f"out-{name}"
        code, err = run_in_process(
            command_line("generate", corpus["good"], out, "--init-image", path, "--mask", path), capsys
        )
        assert code == 0, err
        assert Image.open(out / "images" / "image-000.png").size == (16, 16)


def test_a_user_sees_one_line_from_real_fixative_processes(corpus, tmp_path):
    """What the in-process runs stand for: the installed command, stderr as a terminal shows it."""
    cases = [
        command_line("info", corpus["empty.ckpt"], tmp_path),
        command_line("convert", corpus["code.ckpt"], tmp_path),
        command_line("generate", corpus["good"], tmp_path, "--init-image", corpus["huge.png"]),
    ]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "fixative", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for argv in cases
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert_refused(process.returncode, err, tmp_path, corpus)
        assert err.startswith("fixative: error:"), err
