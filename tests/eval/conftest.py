"""Fixtures shared by the eval tests."""

from __future__ import annotations

import pytest
import torch

from fixative.eval.inception import FIDInceptionV3


@pytest.fixture(scope="session")
def random_inception_file(tmp_path_factory):
    """A FID Inception weights file with random weights (no pretrained file exists here), its batch norms
    calibrated on random images so that features are of order one rather than vanishing through 90 layers.
    Saved under the release's file name, as a user would have it."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = this batch's
    network.train()
    with torch.no_grad():
        network(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def shipped():
    """The toy world shipped in core/toy/weights (as tests/core/toy/conftest.py has it)."""
    from fixative.core.toy import SHIPPED

    if not (SHIPPED / "sd" / "model_index.json").is_file():
        pytest.skip("no toy weights shipped in this checkout")
    return SHIPPED


@pytest.fixture(scope="session")
def toy_clip(shipped):
    return shipped / "clip"


@pytest.fixture(scope="session")
def toy_model(shipped):
    from fixative.core.checkpoints import load_model

    return load_model(shipped / "sd")


@pytest.fixture(scope="session")
def paintings():
    """paintings(artist, subjects, seed=0) -> uint8 (N, 3, 64, 64) Toy Atelier paintings."""
    import numpy as np

    from fixative.core.toy import atelier

    def paint(artist: str, subjects: list[str], seed: int = 0) -> torch.Tensor:
        style = {a.name: a for a in atelier.ARTISTS}[artist]
        images = [np.asarray(atelier.paint(style, s, 64, seed, i)) for i, s in enumerate(subjects)]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()

    return paint


@pytest.fixture(scope="session")
def ci_build(tmp_path_factory):
    """A `ci`-size toy build (a few steps per stage; about half a minute), as tests/core/toy/conftest.py has it."""
    from fixative.core.toy import build as toy_build

    return toy_build.build(tmp_path_factory.mktemp("toy") / "ci", seed=0, size="ci", progress=False, log=lambda _: None)
