"""Fixtures and assertions shared by every test package."""

from __future__ import annotations

import pytest
import torch

from fixative.core.checkpoints import save_diffusers
from fixative.core.model import StableDiffusionModel
from fixative.core.presets import get_preset


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4, what: str = "outputs") -> None:
    """Parity with a reference: max |actual - expected| within ``tolerance`` x max(1, max |expected|), compared in
    float32 on the CPU (non-finite reference entries must be matched exactly)."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, reference {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    same_non_finite = (actual[~finite] == expected[~finite]) | (actual[~finite].isnan() & expected[~finite].isnan())
    assert torch.equal(finite, torch.isfinite(actual)) and bool(same_non_finite.all()), (
        f"{what}: non-finite entries differ from the reference")
    scale = expected[finite].abs().max().item() if finite.any() else 1.0
    bound = tolerance * max(1.0, scale)
    difference = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert difference <= bound, f"{what} differ from the reference by {difference:.3g} (max abs; allowed {bound:.3g})"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny networks: one thread is fastest, and it avoids OpenMP spin-waits (tens of times
    slower) when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """Factory of diffusers folders holding random-weight models written by fixative, each made once per session:
    ``sd_folder("tiny-sd2", seed=0, dtype=torch.float16, prediction_type="v_prediction")`` (keyword arguments
    beyond seed and dtype override the preset's scheduler settings). Tests must not modify the folders."""
    made = {}

    def make(preset: str = "tiny-sd1", seed: int = 0, dtype: torch.dtype | None = None, **scheduler_settings):
        key = (preset, seed, str(dtype), tuple(sorted(scheduler_settings.items())))
        if key not in made:
            config = get_preset(preset)
            torch.manual_seed(seed)
            model = StableDiffusionModel.from_config(config.model_config,
                                                     {**config.scheduler_config, **scheduler_settings})
            made[key] = save_diffusers(model, tmp_path_factory.mktemp(preset) / preset, dtype=dtype)
        return made[key]

    return make
