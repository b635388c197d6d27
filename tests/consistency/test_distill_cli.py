"""`fixative distill` end to end on a tiny teacher folder and an image folder with captions; then
`fixative generate --scheduler lcm` renders the results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from distill_helpers import tiny_teacher
from PIL import Image

from fixative.cli import main
from fixative.core.checkpoints import save_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = save_diffusers(tiny_teacher(), root / "teacher")
    data = root / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as metadata:
        for i, caption in enumerate(["a red square", "a blue circle", "a green line"]):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return root, teacher, data


@pytest.mark.parametrize(
    "method, result, generate_options",
    [
        ("lcd", "model_index.json", ["--guidance", "4"]),
        ("lcm-lora", "pytorch_lora_weights.safetensors", ["--guidance", "1"]),
        ("ict", "model_index.json", ["--guidance", "1"]),
    ],
)
def test_distill_then_generate(setup, method, result, generate_options, capsys):
    root, teacher, data = setup
    out = root / method
    code = main(
        [
            "distill",
            "--teacher",
            str(teacher),
            "--data",
            str(data),
            "--out",
            str(out),
            "--method",
            method,
            "--max-steps",
            "2",
            "--checkpoint-every",
            "1",
            "--validation-prompt",
            "a red square",
            "--validation-prompt",
            "a blue circle",
            "--batch-size",
            "2",
            "--num-ddim-timesteps",
            "10",
            "--time-cond-proj-dim",
            "16",
            "--rank",
            "2",
            "--lr",
            "1e-3",
            "--resolution",
            "16",
            "--seed",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    assert (out / result).is_file()
    assert json.loads((out / "distill_config.json").read_text())["method"] == method
    for stage in ("step-1", "final"):  # the validation grid: a row per prompt, 1, 2 and 4 steps across
        grid = Image.open(out / "validation" / stage / "grid.png")
        assert grid.size == (3 * 16, 2 * 16)
        assert (
            np.asarray(grid)[:16, :16].tolist()
            == np.asarray(Image.open(out / "validation" / stage / "00-1-steps.png")).tolist()
        )
    model = teacher if method == "lcm-lora" else out
    extra = ["--lora", str(out)] if method == "lcm-lora" else []
    code = main(
        [
            "generate",
            "--model",
            str(model),
            *extra,
            "--scheduler",
            "lcm",
            "--steps",
            "2",
            *generate_options,
            "--prompt",
            "a red square",
            "--out",
            str(root / f"{method}.png"),
            "--quiet",
        ]
    )
    assert code == 0 and Image.open(root / f"{method}.png").size == (16, 16)


def test_bad_input_is_a_one_line_error(setup, capsys):
    root, teacher, data = setup
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher),
                "--data",
                str(root / "missing"),
                "--out",
                str(root / "x"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher),
                "--data",
                str(data),
                "--out",
                str(root / "y"),
                "--w-min",
                "9",
                "--w-max",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "does not exist" in errors[0] and "w_min <= w_max" in errors[1]
