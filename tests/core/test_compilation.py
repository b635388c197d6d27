"""The optional compiled path: torch.compile'd networks give eager's numbers within the parity tolerance."""

from __future__ import annotations

import pytest
import torch

from fixative.core.checkpoints import load_model, save_diffusers
from fixative.core.compilation import compile_model, compile_network
from fixative.core.config import UNetConfig
from fixative.core.errors import FixativeError
from fixative.core.model import StableDiffusionModel
from fixative.core.presets import get_preset
from fixative.core.unet import ResnetBlock2D, Transformer2DModel, UNet2DConditionModel

# the smallest UNet with every kind of block (down and up ResNets, a transformer, mid block, up-sampling):
# compiling takes seconds per graph node, so the graph is kept short
TINY = UNetConfig(
    block_out_channels=(16, 32),
    cross_attention_blocks=(True, False),
    layers_per_block=1,
    num_heads=2,
    norm_num_groups=8,
    cross_attention_dim=16,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def assert_parity(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """tests/core/test_unet.py's tolerance."""
    error = (ours - reference).abs().max().item()
    assert error <= 1e-4 * max(1.0, reference.abs().max().item()), f"max abs difference {error:.3g}"


@pytest.mark.slow
def test_compiled_unet_matches_eager_and_reports_the_compile_time_once():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(TINY).eval()
    latents, text_embeddings = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    with torch.no_grad():
        eager = unet(latents, torch.tensor([3, 741]), text_embeddings)
        reports = []
        compile_network(unet, "unet", report=reports.append)
        compiled = unet(latents, torch.tensor([3, 741]), text_embeddings)
        again = unet(latents, torch.tensor([3, 741]), text_embeddings)
    assert len(reports) == 1 and reports[0].startswith("compiled unet in ")
    assert_parity(compiled, eager)
    assert_parity(again, eager)
    assert set(unet.state_dict()) == set(UNet2DConditionModel(TINY).state_dict())  # keys unchanged
    del unet.forward
    assert "forward" not in vars(unet)


class _ResnetAndTransformer(torch.nn.Module):
    """One ResNet and one transformer of TINY: the convolutions, GroupNorm, Linear layers and attention that
    freezing packs and fuses, in a graph that compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.resnet = ResnetBlock2D(16, 32, 64, groups=8, eps=1e-5)
        self.transformer = Transformer2DModel(32, heads=2, config=TINY)

    def forward(self, hidden, time_features, text_embeddings):
        return self.transformer(self.resnet(hidden, time_features), text_embeddings)


@pytest.mark.slow
def test_frozen_compilation_matches_eager_in_channels_last_inference():
    torch.manual_seed(0)
    network = _ResnetAndTransformer().eval()
    hidden = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)  # as the UNet infers on the CPU
    time_features, text_embeddings = torch.randn(2, 64), torch.randn(2, 77, 16)
    with torch.no_grad():
        eager = network(hidden, time_features, text_embeddings)
        reports = []
        compile_network(network, "block", report=reports.append, freeze=True)
        frozen = network(hidden, time_features, text_embeddings)
    assert len(reports) == 1
    assert_parity(frozen, eager)


def test_load_model_compiles_the_unet_only_when_asked(tmp_path):
    preset = get_preset("tiny-sd1")
    folder = save_diffusers(
        StableDiffusionModel.from_config(preset.model_config, preset.scheduler_config), tmp_path / "tiny"
    )
    assert "forward" not in vars(load_model(folder).unet)
    model = load_model(folder, compile=True)  # compiling happens at the first call, not here
    assert "forward" in vars(model.unet) and "forward" not in vars(model.vae.decoder)
    compile_model(model, networks=("vae",))
    assert "forward" in vars(model.vae.encoder) and "forward" in vars(model.vae.decoder)
    with pytest.raises(FixativeError, match="cannot compile 'tokenizer'"):
        compile_model(model, networks=("tokenizer",))


def test_generate_compile_option_compiles_the_unet(monkeypatch, tmp_path):
    from fixative.cli import main
    from fixative.core import compilation

    preset = get_preset("tiny-sd1")
    folder = save_diffusers(
        StableDiffusionModel.from_config(preset.model_config, preset.scheduler_config), tmp_path / "tiny"
    )
    compiled = []
    monkeypatch.setattr(compilation, "compile_model", lambda model: compiled.append(model) or model)
    argv = [
        "generate",
        "--model",
        str(folder),
        "--prompt",
        "a lighthouse",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--quiet",
    ]
    assert main([*argv, "--out", str(tmp_path / "eager.png")]) == 0 and not compiled
    assert main([*argv, "--compile", "--out", str(tmp_path / "compiled.png")]) == 0 and len(compiled) == 1
