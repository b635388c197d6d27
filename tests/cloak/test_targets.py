"""Target styles on the toy world: ``auto`` picks one of the other Atelier artists, at the 50th-75th percentile of
the toy CLIP's distance from the artworks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixative.cloak.targets import auto_style, pattern_target, toy_candidates
from fixative.core.toy import atelier, clip_folder


@pytest.fixture(scope="module")
def zenji_paintings():
    style = next(s for s in atelier.ARTISTS if s.name == "zenji")
    images = [np.asarray(atelier.paint(style, subject, index=i)) for i, subject in enumerate(atelier.SUBJECTS[:4])]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def test_auto_style_picks_another_artist_between_the_50th_and_75th_percentile(zenji_paintings, one_thread):
    candidates, captions = toy_candidates()
    style, distances = auto_style(zenji_paintings, clip_folder(), candidates, captions)
    assert style in candidates and style != "zenji"
    assert min(distances, key=distances.get) == "zenji"  # the toy CLIP knows the artist: the nearest, excluded
    others = sorted(d for name, d in distances.items() if name != "zenji")
    assert np.quantile(others, 0.5) <= distances[style] <= np.quantile(others, 0.75)


def test_pattern_target_is_high_contrast_stripes():
    pattern = pattern_target(torch.zeros(1, 3, 16, 16))
    assert set(pattern.unique().tolist()) == {0.0, 1.0} and torch.equal(pattern[:, 0], pattern[:, 2])
