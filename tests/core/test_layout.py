"""The VAE works channels-last on the CPU only when no gradient is recorded (channels-last GroupNorm
backward is tens of times slower in bf16); the results are the same either way."""

import torch
from torch import nn

from fixative.core.config import AutoencoderKLConfig
from fixative.core.vae import AutoencoderKL, _working_layout

TINY = AutoencoderKLConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)


def test_layout_is_channels_last_only_without_autograd():
    network = nn.Conv2d(3, 3, 1).requires_grad_(False)
    pixels = torch.randn(1, 3, 8, 8)
    channels_last = torch.channels_last
    assert _working_layout(pixels, network).is_contiguous(memory_format=channels_last)
    assert not _working_layout(pixels.requires_grad_(), network).is_contiguous(memory_format=channels_last)
    with torch.no_grad():
        assert _working_layout(pixels, network).is_contiguous(memory_format=channels_last)
    network.requires_grad_(True)
    assert not _working_layout(pixels.detach(), network).is_contiguous(memory_format=channels_last)


def test_encode_gives_the_same_mean_with_and_without_gradients():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY).eval().requires_grad_(False)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        channels_last_mean = vae.encode(pixels).mean
    channels_first_mean = vae.encode(pixels.clone().requires_grad_()).mean
    torch.testing.assert_close(channels_first_mean.detach(), channels_last_mean, rtol=1e-5, atol=1e-5)
