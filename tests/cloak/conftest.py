"""Fixtures of the cloak tests: a tiny random Stable Diffusion model (the VAE halves the size: multiple 2)."""

from __future__ import annotations

import pytest
import torch

from fixative.core.model import StableDiffusionModel
from fixative.core.presets import get_preset


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one thread, and no OpenMP spin-waits when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(one_thread):
    torch.manual_seed(0)
    preset = get_preset("tiny-sd1")
    model = StableDiffusionModel.from_config(
        preset.model_config, dict(preset.scheduler_config, _class_name="DDIMScheduler")
    )
    for network in model.networks().values():
        network.eval().requires_grad_(False)
    return model


@pytest.fixture
def artwork_pixels():
    """Two 24x32 paintings-like images in [0, 1] on the 8-bit grid: smooth colour fields plus stripes."""
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand(2, 3, 3, 4, generator=generator)
    fields = torch.nn.functional.interpolate(coarse, size=(24, 32), mode="bilinear", align_corners=False)
    stripes = (torch.arange(32).view(1, 1, 1, -1) // 4 % 2).float() * 0.2
    return ((fields * 0.8 + stripes).clamp(0, 1) * 255).round() / 255
