"""``fixative convert`` and ``fixative info``: what they print, what they write, and errors without tracebacks."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixative.cli import main
from fixative.core.checkpoints import load_model, save_diffusers, save_single_file
from fixative.core.model import StableDiffusionModel
from fixative.core.presets import get_preset


@pytest.fixture(scope="module")
def sd2_folder(sd_folder):
    return sd_folder("tiny-sd2", dtype=torch.float16, _class_name="DDIMScheduler", prediction_type="v_prediction")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_info_prints_the_facts_of_a_folder(sd2_folder, capsys):
    code, out, err = run(capsys, "info", sd2_folder)
    assert code == 0 and err == ""
    lines = dict(re.fullmatch(r"(\S.*?)\s{2,}(.*)", line).groups() for line in out.splitlines())
    assert lines["architecture"] == "SD 2.x"
    assert lines["prediction type"] == "v_prediction"
    assert lines["stored dtype"] == "unet float16, vae float16, text_encoder float16"
    assert lines["cross-attention"] == "32 wide"
    assert lines["latent channels"] == "4 (VAE x2 down-sampling, scaling factor 0.18215)"
    assert lines["text encoder"] == "OpenCLIP, 2 layers, 32 wide, 1 heads, gelu"
    assert lines["unet"].startswith("4 -> 4 channels, blocks [32, 64], 1 layers per block")
    assert "DDIMScheduler: scaled_linear betas 0.00085 .. 0.012 over 1000 steps" in lines["scheduler"]
    assert "diffusers folder" in lines["model"] and "pads with '!'" in lines["tokenizer"]
    unet_count = sum(p.numel() for p in load_model(sd2_folder).unet.parameters())
    assert lines["parameters"].startswith(f"unet {unet_count / 1e3:.2f} k, ")


def test_info_on_a_single_file_notes_the_assumed_prediction_type(sd2_folder, tmp_path, capsys):
    model = load_model(sd2_folder)
    save_single_file(model, tmp_path / "model.safetensors")
    # the same tensors without fixative's metadata: a file from another tool
    save_file(load_file(tmp_path / "model.safetensors"), tmp_path / "foreign.safetensors")
    code, out, _ = run(capsys, "info", tmp_path / "foreign.safetensors")
    assert code == 0
    assert "(original single file, safetensors)" in out
    assert "note: prediction type assumed epsilon" in out
    code, out, _ = run(capsys, "info", tmp_path / "foreign.safetensors", "--prediction-type", "v_prediction")
    assert "note:" not in out and "v_prediction" in out


def test_convert_folder_to_single_file_and_back(sd2_folder, tmp_path, capsys):
    code, out, err = run(capsys, "convert", sd2_folder, tmp_path / "model.safetensors")
    assert code == 0 and err == "", err
    assert "reading" in out and "writing" in out and "done in" in out
    assert {v.dtype for v in load_file(tmp_path / "model.safetensors").values()} == {torch.float16}  # as stored
    code, out, err = run(capsys, "convert", tmp_path / "model.safetensors", tmp_path / "folder", "--dtype", "bf16")
    assert code == 0, err
    back = load_model(tmp_path / "folder", dtype=torch.bfloat16)
    assert back.details.stored_dtypes["unet"] == "bfloat16"
    assert back.prediction_type == "v_prediction"  # recorded in fixative's single file
    original = load_model(sd2_folder, dtype=torch.bfloat16)
    for key, value in original.unet.state_dict().items():
        assert torch.equal(back.unet.state_dict()[key], value), key
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]


def test_convert_refuses_to_overwrite_without_the_flag(sd2_folder, tmp_path, capsys):
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    code, out, err = run(capsys, "convert", sd2_folder, tmp_path / "taken.safetensors")
    assert code == 2 and "already exists" in err
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"
    code, _, err = run(capsys, "convert", sd2_folder, tmp_path / "taken.safetensors", "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize("command", ["info", "convert"])
def test_errors_are_one_line_without_traceback(command, tmp_path, capsys):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"\x00" * 100)
    argv = [command, bad] + ([tmp_path / "out"] if command == "convert" else [])
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("fixative: error: ") and "broken.ckpt" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_config_option_describes_a_single_file_its_shapes_cannot(sd_folder, tmp_path, capsys):
    """A custom model with 8 GroupNorm groups: refused in one line naming --config, then read with it."""
    custom = StableDiffusionModel.from_config(_custom_config(), get_preset("tiny-sd1").scheduler_config)
    folder = save_diffusers(custom, tmp_path / "custom")
    state = load_file(save_single_file(custom, tmp_path / "with-metadata.safetensors"))
    save_file(state, tmp_path / "custom.safetensors")  # as another tool writes it: tensors only
    code, _, err = run(capsys, "info", tmp_path / "custom.safetensors")
    assert code == 2 and "--config" in err and err.count("\n") == 1
    for command in (
        ["info", tmp_path / "custom.safetensors"],
        ["convert", tmp_path / "custom.safetensors", tmp_path / "converted"],
    ):
        code, out, err = run(capsys, *command, "--config", folder / "unet")
        assert code == 0, err
    assert load_model(tmp_path / "converted").unet.config == custom.unet.config
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        tmp_path / "custom.safetensors",
        "--config",
        folder,
        "--prompt",
        "x",
        "--steps",
        1,
        "--quiet",
        "--out",
        tmp_path / "image.png",
    )
    assert code == 0, err


def _custom_config():
    config = get_preset("tiny-sd1").model_config
    config.unet.block_out_channels, config.unet.norm_num_groups, config.unet.num_heads = (16, 32), 8, (2, 2)
    return config
