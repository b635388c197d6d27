"""The UNet and the VAE work channels-last on the CPU only when no gradient is recorded (channels-last GroupNorm
backward is tens of times slower in bf16); the results are the same either way."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixative.core.config import AutoencoderKLConfig, UNetConfig
from fixative.core.layout import Conv2d, enable_weight_packing, mkldnn_bf16_supported, working_layout
from fixative.core.unet import UNet2DConditionModel
from fixative.core.vae import AutoencoderKL

TINY = AutoencoderKLConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)
TINY_UNET = UNetConfig(
    block_out_channels=(16, 32),
    cross_attention_blocks=(True, True),
    num_heads=2,
    norm_num_groups=4,
    cross_attention_dim=8,
)


def test_layout_is_channels_last_only_without_autograd():
    network = nn.Conv2d(3, 3, 1).requires_grad_(False)
    pixels = torch.randn(1, 3, 8, 8)
    channels_last = torch.channels_last
    assert working_layout(pixels, network).is_contiguous(memory_format=channels_last)
    assert not working_layout(pixels.requires_grad_(), network).is_contiguous(memory_format=channels_last)
    with torch.no_grad():
        assert working_layout(pixels, network).is_contiguous(memory_format=channels_last)
    network.requires_grad_(True)
    assert not working_layout(pixels.detach(), network).is_contiguous(memory_format=channels_last)


def test_encode_gives_the_same_mean_with_and_without_gradients():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY).eval().requires_grad_(False)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        channels_last_mean = vae.encode(pixels).mean
    channels_first_mean = vae.encode(pixels.clone().requires_grad_()).mean
    torch.testing.assert_close(channels_first_mean.detach(), channels_last_mean, rtol=1e-5, atol=1e-5)


def packed_copies(network: nn.Module) -> list[bool]:
    """Per convolution: whether it holds a packed weight, or the up-sampling's packed phase weight."""
    convolutions = [module for module in network.modules() if isinstance(module, Conv2d)]
    folded = [getattr(conv, "_phase_weight_cache", None) for conv in convolutions]
    return [conv._packed is not None or fold is not None for conv, fold in zip(convolutions, folded)]


def test_unet_keeps_no_packed_weights_by_default_in_either_dtype():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(TINY_UNET).eval().requires_grad_(False)
    for dtype in (torch.float32, torch.bfloat16):
        unet.to(dtype)
        with torch.no_grad():
            unet(torch.randn(2, 4, 8, 8).to(dtype), 500, torch.randn(2, 77, 8).to(dtype))
        assert not any(packed_copies(unet))


def test_bf16_unet_with_packing_infers_channels_last_with_packed_weights_and_gives_the_channels_first_output():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(TINY_UNET).eval().requires_grad_(False).to(torch.bfloat16)
    enable_weight_packing(unet, True)
    latents, text_embeddings = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 77, 8).bfloat16()
    with torch.no_grad():
        channels_last_out = unet(latents, 500, text_embeddings)
    if mkldnn_bf16_supported():
        assert unet.conv_in._packed is not None
        assert all(packed_copies(unet))
    else:  # oneDNN has no bf16 convolution on this CPU: F.conv2d's bf16 path, nothing packed
        assert not any(packed_copies(unet))
    channels_first_out = unet(latents.clone().requires_grad_(), 500, text_embeddings)
    assert not any(packed_copies(unet))  # dropped when autograd records
    assert channels_last_out.is_contiguous() and channels_first_out.is_contiguous()
    torch.testing.assert_close(channels_first_out.detach(), channels_last_out, rtol=2e-2, atol=2e-2)


def test_fp32_unet_infers_channels_first_without_packed_weights_even_with_packing_on():
    unet = UNet2DConditionModel(TINY_UNET).eval()
    enable_weight_packing(unet, True)
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), 500, torch.randn(2, 77, 8))
    assert not any(packed_copies(unet))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_convolution_equals_conv2d_and_follows_weight_changes(dtype):
    torch.manual_seed(0)
    conv = Conv2d(6, 8, 3, stride=2, padding=1).to(dtype).requires_grad_(False)
    x = torch.randn(2, 6, 9, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
    packs = dtype == torch.float32 or mkldnn_bf16_supported()
    with torch.no_grad():
        out = conv(x)
        assert (conv._packed is not None) == packs and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1), rtol=0, atol=0)
        conv.weight.mul_(2.0)  # an in-place update (a training step, a LoRA merge) repacks
        conv.bias.add_(1.0)
        expected = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
        torch.testing.assert_close(conv(x), expected, rtol=0, atol=0)
        # channels-first: plain conv; oneDNN may pick another algorithm per layout (AVX2 does), so equal up to rounding
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(conv(x.contiguous()), expected, rtol=tolerance, atol=tolerance)
    assert conv._packed is None
    conv.requires_grad_(True)
    conv(x).sum().backward()  # recording gradients: plain conv, nothing packed
    assert conv._packed is None and conv.weight.grad is not None


def test_unet_with_and_without_weight_packing_gives_the_same_output_and_off_keeps_no_packed_copies():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(TINY_UNET).eval().to(torch.bfloat16)
    latents, text_embeddings = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 77, 8).bfloat16()
    with torch.no_grad():
        enable_weight_packing(unet, True)
        packed_out = unet(latents, 500, text_embeddings)
        assert all(packed_copies(unet)) == mkldnn_bf16_supported()
        enable_weight_packing(unet, False)
        plain_out = unet(latents, 500, text_embeddings)
    assert not any(packed_copies(unet))
    torch.testing.assert_close(plain_out, packed_out, rtol=2e-2, atol=2e-2)  # bf16: channels-first vs -last


def test_bf16_vae_encodes_channels_last_on_any_cpu():
    """The mimic caches bf16 latents without autograd: a CPU whose oneDNN has no bf16 convolution (no AVX-512)
    must fall back to F.conv2d's bf16 path, not fail to build a packed weight."""
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY).eval().requires_grad_(False)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        fp32_mean = vae.encode(pixels).mean
        bf16_mean = vae.to(torch.bfloat16).encode(pixels.bfloat16()).mean
    torch.testing.assert_close(bf16_mean.float(), fp32_mean, rtol=5e-2, atol=5e-2)
