import json

import numpy as np
import pytest
from PIL import Image

from fixative.core.errors import FixativeError
from fixative.core.toy.atelier import (
    ARTISTS,
    SUBJECTS,
    AtelierConfig,
    artist_names,
    load_split,
    paint,
    style_grid,
    write_atelier,
)

SMALL = AtelierConfig(seed=3, resolution=32, images_per_artist=16)


def test_paint_is_deterministic_and_depends_on_seed():
    a = np.asarray(paint(ARTISTS[0], "cat", 64, seed=1, index=5))
    b = np.asarray(paint(ARTISTS[0], "cat", 64, seed=1, index=5))
    c = np.asarray(paint(ARTISTS[0], "cat", 64, seed=2, index=5))
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_atelier_has_enough_artists_subjects_and_held_out_artists():
    assert len(ARTISTS) >= 8 and len(SUBJECTS) >= 8
    assert len({a.name for a in ARTISTS}) == len(ARTISTS)
    assert len(artist_names(held_out=True)) >= 2
    assert AtelierConfig().images_per_artist >= 100
    assert {"house", "tree", "boat", "sun", "mountain", "fish", "flower", "cat"} <= set(SUBJECTS)


def test_styles_differ_more_between_artists_than_within():
    # mean colour of each artist's paintings: artists must be far apart compared to within-artist spread
    means = np.stack(
        [[np.asarray(paint(a, s, 32, 0, i), np.float32).mean((0, 1)) for i, s in enumerate(SUBJECTS)] for a in ARTISTS]
    )  # (artists, subjects, 3)
    within = np.linalg.norm(means - means.mean(1, keepdims=True), axis=-1).mean()
    centres = means.mean(1)
    between = min(np.linalg.norm(centres[i] - centres[j]) for i in range(len(ARTISTS)) for j in range(i))
    assert between > 1.5 * within, (between, within)


def test_write_atelier_is_deterministic_and_an_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = write_atelier(tmp_path / "a", SMALL, progress=False)
    again = write_atelier(tmp_path / "b", SMALL, progress=False)
    for split in ("train", "test"):
        rows = load_split(out, split)
        assert rows == [dict(r, path=r["path"].replace(str(again), str(out))) for r in load_split(again, split)]
        for row in rows[::7]:
            assert (out / split / row["file_name"]).read_bytes() == (again / split / row["file_name"]).read_bytes()
    data = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf"))
    assert set(data) == {"train", "test"}
    n_test = round(16 * SMALL.test_fraction)
    assert len(data["train"]) == len(ARTISTS) * (16 - n_test) and len(data["test"]) == len(ARTISTS) * n_test
    row = data["train"][0]
    assert row["image"].size == (32, 32)
    assert row["text"] == f"a painting of a {row['subject']} by {row['artist']}"
    held = {r["artist"] for r in data["train"] if r["held_out"]}
    assert held == set(artist_names(held_out=True))
    description = json.loads((out / "atelier.json").read_text())
    assert description["held_out_artists"] == artist_names(held_out=True)
    assert description["config"]["seed"] == 3


def test_write_atelier_into_complete_folder_is_a_no_op_and_refuses_another(tmp_path):
    out = write_atelier(tmp_path / "a", SMALL, progress=False)
    stamp = (out / "train" / "metadata.jsonl").stat().st_mtime_ns
    write_atelier(out, SMALL, progress=False)
    assert (out / "train" / "metadata.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(FixativeError, match="different Toy Atelier"):
        write_atelier(out, AtelierConfig(seed=4, resolution=32, images_per_artist=16), progress=False)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_style_grid_has_one_row_per_artist(tmp_path):
    grid = style_grid(32, path=tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == grid.size
    assert grid.size[1] == len(ARTISTS) * 34 + 2
