"""benchmarks/mimic_seeds.py's --pixels input: a cloak stage's file read back as it was written, bad ones refused."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "mimic_seeds.py"


@pytest.fixture(scope="module")
def mimic_seeds():
    spec = importlib.util.spec_from_file_location("mimic_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pixels_file_reads_a_stage_file(mimic_seeds, tmp_path):
    pixels = torch.rand(3, 3, 8, 8) * 2 - 1
    path = tmp_path / "cloak.pt"
    torch.save({"pixels": pixels, "values": {}}, path)
    artist, read = mimic_seeds.pixels_file(f"zenji={path}")
    assert artist == "zenji"
    assert torch.equal(read, pixels)


@pytest.mark.parametrize(
    "blob, message",
    [
        (torch.zeros(3, 3, 8, 8), "expected a cloak stage"),  # a bare tensor, not a stage's dict
        ({"pixels": torch.zeros(3, 8, 8)}, "expected a cloak stage"),
        ({"pixels": torch.rand(2, 3, 8, 8) * 2}, "lie in \\[-1, 1\\]"),  # [0, 2]: not a stage's range
    ],
)
def test_pixels_file_refuses_other_files(mimic_seeds, tmp_path, blob, message):
    path = tmp_path / "bad.pt"
    torch.save(blob, path)
    with pytest.raises(SystemExit, match=message):
        mimic_seeds.pixels_file(f"zenji={path}")


def test_pixels_file_needs_artist_and_file(mimic_seeds):
    with pytest.raises(SystemExit, match="ARTIST=FILE"):
        mimic_seeds.pixels_file("cloak.pt")


def test_went_lists_the_attributed_artists_most_first(mimic_seeds):
    assert mimic_seeds.went({"zenji": 50, "lumo": 0, "kovra": 14}) == "zenji 50, kovra 14"
