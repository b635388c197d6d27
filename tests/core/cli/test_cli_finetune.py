"""``fixative finetune`` and ``fixative generate --lora``: end to end on a tiny model, one-line errors."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fixative.cli import main
from fixative.core import finetune
from fixative.core.checkpoints import load_model, save_diffusers
from fixative.core.cli import finetune as finetune_cli
from fixative.core.lora import apply_lora
from fixative.core.model import StableDiffusionModel
from fixative.core.pipelines import generate
from fixative.core.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    preset = get_preset("tiny-sd1")
    return save_diffusers(
        StableDiffusionModel.from_config(preset.model_config, preset.scheduler_config),
        tmp_path_factory.mktemp("cli") / "tiny-sd1",
    )


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"zenji, painting, tag{i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


ISSUE_OPTIONS = (
    "--model",
    "--data",
    "--out",
    "--method",
    "--rank",
    "--alpha",
    "--train-text-encoder",
    "--instance-prompt",
    "--class-prompt",
    "--prior-images",
    "--prior-loss-weight",
    "--resolution",
    "--max-steps",
    "--batch-size",
    "--gradient-accumulation",
    "--lr",
    "--lr-schedule",
    "--warmup",
    "--ema-decay",
    "--snr-gamma",
    "--offset-noise",
    "--caption-dropout",
    "--mixed-precision",
    "--gradient-checkpointing",
    "--checkpoint-every",
    "--resume",
    "--validation-prompt",
    "--seed",
    "--device",
    "--caption-column",
    "--min-width",
    "--min-height",
    "--min-similarity",
    "--max-watermark",
    "--max-unsafe",
    "--center-crop",
    "--random-crop",
    "--random-flip",
    "--shuffle-tags",
    "--cache-latents",
)


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ISSUE_OPTIONS:
        assert option in text, f"{option} missing from --help"
    parser = argparse.ArgumentParser()
    finetune_cli.register(parser.add_subparsers())
    actions = parser._subparsers._group_actions[0].choices["finetune"]._actions
    for action in actions:
        if action.dest != "help":
            assert action.help and ("default" in action.help or action.required), f"{action.option_strings}: no default"


def test_the_cli_offers_what_fine_tune_accepts():
    assert finetune_cli.METHODS == finetune.METHODS
    assert finetune_cli.LR_SCHEDULES == finetune.LR_SCHEDULES
    assert finetune_cli.MIXED_PRECISION == tuple(finetune.MIXED_PRECISION)


def test_finetune_lora_then_generate_with_it_renders_what_python_renders(capsys, tmp_path, model_folder, data_folder):
    out = tmp_path / "lora"
    code = main(
        [
            "finetune",
            "--model",
            str(model_folder),
            "--data",
            str(data_folder),
            "--out",
            str(out),
            "--caption-column",
            "caption",
            "--method",
            "lora",
            "--rank",
            "2",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "0.05",
            "--shuffle-tags",
            "--random-flip",
            "--quiet",
            "--seed",
            "3",
        ]
    )
    assert code == 0 and capsys.readouterr().out.strip() == str(out / "pytorch_lora_weights.safetensors")
    render = tmp_path / "render.png"
    code = main(
        [
            "generate",
            "--model",
            str(model_folder),
            "--lora",
            f"{out}:0.5",
            "--prompt",
            "zenji, painting",
            "--steps",
            "2",
            "--quiet",
            "--out",
            str(render),
            "--scheduler",
            "ddim",
        ]
    )
    assert code == 0
    model = load_model(model_folder)
    plain = generate(model, "zenji, painting", num_inference_steps=2, scheduler="ddim", seed=0, guidance_scale=7.5)[0]
    apply_lora(model, out / "pytorch_lora_weights.safetensors", 0.5)
    expected = generate(model, "zenji, painting", num_inference_steps=2, scheduler="ddim", seed=0, guidance_scale=7.5)[
        0
    ]
    ours = Image.open(render)
    assert np.array_equal(np.asarray(ours), np.asarray(expected))
    assert not np.array_equal(np.asarray(ours), np.asarray(plain))
    assert ours.text["lora"] == f"{out / 'pytorch_lora_weights.safetensors'}:0.5"


def one_line_error(capsys, *argv) -> str:
    assert main([*map(str, argv)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fixative: error:"), lines
    return lines[0]


def test_bad_inputs_are_one_line_errors(capsys, tmp_path, model_folder, data_folder):
    base = ["finetune", "--model", model_folder, "--out", tmp_path / "out", "--quiet"]
    assert "no caption column 'text'" in one_line_error(capsys, *base, "--data", data_folder)
    assert "give --images" in one_line_error(capsys, *base, "--data", tmp_path / "meta.parquet")
    assert "dreambooth needs" in one_line_error(
        capsys, *base, "--data", data_folder, "--caption-column", "caption", "--method", "dreambooth"
    )
    assert "exclude each other" in one_line_error(
        capsys, *base, "--data", data_folder, "--center-crop", "--random-crop"
    )
    assert "does not exist" in one_line_error(
        capsys,
        "generate",
        "--model",
        model_folder,
        "--prompt",
        "x",
        "--lora",
        tmp_path / "missing.safetensors",
        "--out",
        tmp_path / "x.png",
    )
    (tmp_path / "bad.safetensors").write_bytes(b"<html>not a LoRA</html>")
    assert "not a readable" in one_line_error(
        capsys,
        "generate",
        "--model",
        model_folder,
        "--prompt",
        "x",
        "--lora",
        tmp_path / "bad.safetensors",
        "--out",
        tmp_path / "x.png",
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.png").exists()
