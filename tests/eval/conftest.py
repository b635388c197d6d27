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
def toy_clip():
    from fixative.core.toy import SHIPPED

    if not (SHIPPED / "clip" / "config.json").is_file():
        pytest.skip("no toy weights shipped in this checkout")
    return SHIPPED / "clip"


def paintings(artist: str, subjects: list[str], seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, 64, 64) Toy Atelier paintings."""
    import numpy as np

    from fixative.core.toy import atelier

    style = {a.name: a for a in atelier.ARTISTS}[artist]
    images = [np.asarray(atelier.paint(style, s, 64, seed, i)) for i, s in enumerate(subjects)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
