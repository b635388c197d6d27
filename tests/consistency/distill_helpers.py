"""Helpers of the consistency tests: a tiny random SD 1.x-shaped teacher (fixative's own networks) and data."""

from __future__ import annotations

import torch

from fixative.core.datasets import ImageCaptions
from fixative.core.model import StableDiffusionModel
from fixative.core.presets import get_preset, scheduler_config


def tiny_teacher(prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionModel:
    """tiny-sd1 with random weights (8x8 latents, 16 px images) and SD's training schedule, DDIM sampler."""
    torch.manual_seed(seed)
    preset = get_preset("tiny-sd1")
    return StableDiffusionModel.from_config(preset.model_config, scheduler_config("DDIMScheduler", prediction_type))


CAPTIONS = ["a red square", "a blue circle", "a green line", "a dark sky"]


def toy_data(n: int = 4) -> ImageCaptions:
    """n random 16 x 16 images (the tiny teacher's size) with captions."""
    pixels = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return ImageCaptions(pixels, CAPTIONS[:n])
